#!/usr/bin/env bash
# A measurement queue for a GPU machine: measure what is pending, in priority order, within a time budget.
# Made for a GPU box you rent by the hour: run `next` as often as the box lives; each call skips what results/
# already records as done, runs the pending items each under its own budget, and packs what finished.
#
#   bash launch/device.sh plan                   # the queue: each item's budget, what it needs, done or pending
#   bash launch/device.sh next [--data=DIR] [--out=DIR] [--budget=S]
#                                                # run the pending items, at most S seconds in all (default: no
#                                                # limit); after each item, pack results/ and runs/ to
#                                                # DIR/results.tgz (--out, else $OUT, else /tmp/fastres-queue)
#   bash launch/device.sh unpack DIR             # back in your checkout: DIR/results.tgz into results/ and runs/
#   bash launch/device.sh prepare                # in your checkout, before copying the tree to a machine that
#                                                # gets no .git: record HEAD in .device/ (copy .device/ along)
#
# CIFAR-10 comes from --data=DIR, else $FASTRES_DATA, else data (the data root: DIR holds cifar-10-batches-py);
# without it the items marked [data] wait, said in one line, and the others run.
# The queue, in priority order (an item is done when results/device/<item>.json exists: commit it with results/):
#   check      120 s  tests/test_cuda.py: the step graph's capture, the fast loop without host syncs
#   throughput 180 s  fast.toml on synthetic data, with and without precision.step_graph, batch 512 and 1024,
#                     each beside the same-process baseline and the floor measured there (results/bench.json)
#   profile    120 s  where a step's time goes, three of those variants (results/profile/*.txt)
#   imagenet   180 s  ResNet-50 at 224 on synthetic data, batch 256, bf16 + channels_last + compile, with and without
#                     precision.step_graph, beside the same-process eager fp32 baseline and the public rates
#                     (results/bench-imagenet.json)
#   jpeg       180 s  2,000 generated ImageNet-like JPEGs through every folder loader: Pillow workers, torchvision's
#                     decoder in workers, its nvJPEG (the gpu loader), DALI's mixed decoder (results/jpeg.json)
#   quick      330 s  [data] configs/stack-quick.toml: the ladder on 10 epochs, each run stopped at 80% test
#   table      300 s  [data] the same ladder's one-GPU rows x 3 seeds, 4 runs at once, each row's speed alone:
#                     aggregate img/s packed vs alone, derived vs measured (results/stack-table/packing.json)
#   recipes    400 s  [data] configs/tune-recipe.toml: 8 recipe rows on the validation split
#   ladder     540 s  [data] configs/stack.toml, resuming          depths  540 s  [data] configs/depths.toml
# BUDGET_<item>=S changes an item's budget (whole seconds; 0 skips the item in this call). A ladder stopped by its budget keeps its unfinished runs'
# checkpoints (they are packed too); the next `next` resumes them. FASTRES_DEVICE_DRYRUN=1 walks the queue
# on a CPU (tiny runs, synthetic data, one variant of each step form, results under runs/device-dryrun/) to test it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

die() { echo "launch/device.sh: $*" >&2; exit 2; }

ITEMS="check throughput profile imagenet jpeg quick table recipes ladder depths"
DRY=${FASTRES_DEVICE_DRYRUN:-}
R=results  # where results and the done marks go; a dry run keeps its own apart from the real ones
[ -z "$DRY" ] || R=runs/device-dryrun/results
OUT_DIR=${OUT:-${TMPDIR:-/tmp}/fastres-queue}
DATA=${FASTRES_DATA:-data}
CALL_BUDGET=${FASTRES_QUEUE_BUDGET_S:-0}  # 0: no limit for the call

prepare() {  # .device/git_sha and .device/code_hash: what fastres records as the code version where .git is absent
  mkdir -p .device
  local sha dirty
  sha=$(git rev-parse HEAD) || die "prepare records the git HEAD: run it in a git checkout of fastres"
  dirty=$(git status --porcelain --untracked-files=no -- fastres configs)
  echo "$sha${dirty:+-dirty}" > .device/git_sha
  python3 -c "from fastres.log import code_hash; print(code_hash())" > .device/code_hash  # for this code only
  echo "runs from a copy of this tree will record git_sha $(cat .device/git_sha) (code hash $(cat .device/code_hash));"
  echo "copy .device/ along with the tree"
}

unpack() {
  local dir=${1:?usage: launch/device.sh unpack DIR (the folder holding results.tgz)}
  [ -f "$dir/results.tgz" ] || die "no results.tgz in $dir"
  tar -xzf "$dir/results.tgz" -C "$root"
  echo "unpacked: $(tar -tzf "$dir/results.tgz" | grep -c .) entries into results/ and runs/"
  [ -f "$dir/device.log" ] && tail -n 5 "$dir/device.log"
  git status --short results
}

pack() {  # results/ and runs/ to $OUT_DIR/results.tgz, less the checkpoints of finished runs (summary.json beside)
  local list
  mkdir -p "$OUT_DIR"
  list=$(mktemp)
  : > "$list"
  [ ! -d results ] || find results -type f >> "$list"
  if [ -d runs ]; then
    find runs -type f ! -name checkpoint.pt >> "$list"
    find runs -name checkpoint.pt | while read -r c; do
      [ -f "$(dirname "$c")/summary.json" ] || echo "$c"
    done >> "$list"
  fi
  tar -czf "$OUT_DIR/results.tgz" -T "$list"
  echo "packed $(wc -l < "$list") files: $(du -h "$OUT_DIR/results.tgz" | cut -f1) in $OUT_DIR/results.tgz"
  rm -f "$list"
}

item_info() {  # NAME: sets budget (seconds; BUDGET_<NAME> overrides) and needs ("data" or empty)
  case $1 in
    check) budget=120 needs= ;;
    throughput) budget=180 needs= ;;
    profile) budget=120 needs= ;;
    imagenet) budget=180 needs= ;;
    jpeg) budget=180 needs= ;;
    quick) budget=330 needs=data ;;
    table) budget=300 needs=data ;;
    recipes) budget=400 needs=data ;;
    ladder) budget=540 needs=data ;;
    depths) budget=540 needs=data ;;
    *) return 1 ;;
  esac
  local var="BUDGET_$1"
  budget=${!var:-$budget}
  [[ $budget =~ ^[0-9]+$ ]] || die "$var=$budget: a whole number of seconds (0 skips $1)"
}

writable() {  # DIR...: folders the queue writes; each made if missing and written to once, or one line and exit 2
  local d
  for d in "$@"; do
    { mkdir -p "$d" && : > "$d/.write-test" && rm -f "$d/.write-test"; } 2>/dev/null || \
      die "cannot write to $d, where the queue writes what it measures: make it writable (or move what is in the" \
          "way) and call again; nothing was run"
  done
}

item_done() { [ -f "$R/device/$1.json" ]; }

have_data() { [ -d "$DATA/cifar-10-batches-py" ] || [ -f "$DATA/data_batch_1" ] || [ -d "$DATA/cifar10/cifar-10-batches-py" ]; }

# The step forms throughput and profile measure: label|flags on top of configs/fast.toml.
VARIANTS=("b512-reduce-overhead|" "b512-step-graph|--precision.step_graph=true --precision.compile_mode=default"
          "b1024-reduce-overhead|--optim.batch_size=1024"
          "b1024-step-graph|--optim.batch_size=1024 --precision.step_graph=true --precision.compile_mode=default")
# A dry run: the same commands, CPU-sized (ResNet-8, batches of 64, no compile, no autocast), for one variant of
# each step form (tests/test_launch.py loads every variant's flags).
[ -z "$DRY" ] || VARIANTS=("${VARIANTS[0]}" "${VARIANTS[1]}")
TINY=(--run.device=cpu --data.source=synthetic --data.subset=1024 --data.val_size=128 --data.test_subset=128 --model.depth=8
      --precision.compile=false --precision.amp=off --data.num_workers=0)

stack_item() {  # CONFIG RUNS_NAME ITEM_BUDGET [DRY_ROWS [DRY_FLAGS...]]: a ladder within the item's budget, resuming
  local extra=() stop=$(( $3 > 40 ? $3 - 20 : $3 / 2 + 1 ))  # the ladder stops itself before the item's timeout
  [ -z "$DRY" ] || extra=(--device=cpu --only="$4" --seeds=1 --runs=runs/device-dryrun/"$2" --out="$R/$2" "${TINY[@]}"
                          --run.epochs=1 "${@:5}")
  python3 -m fastres.tools.stack --config "$1" --budget-s="$stop" "${extra[@]}"
}

stack_runs() {  # ITEM: its stack's runs directory name
  case $1 in quick) echo stack-quick ;; table) echo stack-table ;; recipes) echo tune-recipe ;; ladder) echo stack ;; depths) echo depths ;; esac
}

stack_complete() {  # RUNS_NAME: every row of the ladder is done (or needs more GPUs than there are)
  local manifest=runs/$1/stack.json
  [ -z "$DRY" ] || manifest=runs/device-dryrun/$1/stack.json
  python3 -c 'import json, sys; rows = json.load(open(sys.argv[1]))["rows"]
sys.exit(0 if all(r["status"] in ("done", "not selected") or r["status"].startswith("needs") for r in rows) else 1)' \
    "$manifest" 2>/dev/null
}

item() {  # NAME BUDGET: one item's commands (run by `next` under its budget)
  local name=$1 budget=$2 v label flags dry_batch=() rc=0
  [ -z "$DRY" ] || dry_batch=(--optim.batch_size=64)
  case $name in
    check) python3 -m pytest -q -x tests/test_cuda.py ;;
    throughput|profile)
      for v in "${VARIANTS[@]}"; do
        label=${v%%|*} flags=${v#*|}
        [ "$name" = profile ] && [ "$label" = b1024-reduce-overhead ] && continue  # three variants profiled
        # shellcheck disable=SC2086  # flags are several words
        if [ "$name" = throughput ]; then
          python3 -m fastres.tools.bench train --config configs/fast.toml --data.source=synthetic \
            --label="fast $label synthetic" --out="$R/bench.json" ${DRY:+--steps=2 --warmup=1} ${DRY:+"${TINY[@]}"} \
            "${dry_batch[@]}" $flags || rc=$?
        else
          python3 -m fastres.tools.bench profile --config configs/fast.toml --data.source=synthetic \
            --label="fast-$label" --out="$R/profile" ${DRY:+--steps=2} ${DRY:+"${TINY[@]}"} "${dry_batch[@]}" $flags \
            || rc=$?
        fi
      done
      return "$rc" ;;
    imagenet)
      local imagenet_dry=()
      [ -z "$DRY" ] || imagenet_dry=(--steps=2 --warmup=1 --run.device=cpu --model.width=8 --data.image_size=64
                                     --data.subset=64 --data.test_subset=16 --optim.batch_size=16
                                     --precision.compile=false --precision.amp=off
                                     --baseline-override=--optim.batch_size=16 --baseline-override=--model.width=8
                                     --baseline-override=--run.device=cpu)
      for v in "rn50-b256-compile|" "rn50-b256-step-graph|--precision.step_graph=true"; do
        label=${v%%|*} flags=${v#*|}
        # shellcheck disable=SC2086  # flags are several words
        python3 -m fastres.tools.bench train --config configs/bench-imagenet.toml \
          --baseline configs/bench-imagenet-baseline.toml --label="imagenet $label" --out="$R/bench-imagenet.json" \
          --steps=50 --warmup=10 "${imagenet_dry[@]}" $flags || rc=$?
      done
      return "$rc" ;;
    jpeg)
      if [ -z "$DRY" ]; then
        python3 -m fastres.tools.jpeg --images=2000 --size=224 --batch=128 --depth=50 --steps=20 --epochs=1 \
          --out="$R/jpeg.json"
      else
        python3 -m fastres.tools.jpeg --images=40 --size=32 --batch=8 --depth=18 --width=8 --steps=2 --epochs=1 \
          --workers=1 --out="$R/jpeg.json"
      fi ;;
    quick) stack_item configs/stack-quick.toml stack-quick "$budget" baseline ;;
    table)  # the quick ladder's one-GPU rows x 3 seeds, packed 4 at once, each row's speed alone (packing.json)
      if [ -z "$DRY" ]; then
        python3 -m fastres.tools.stack --config configs/stack-quick.toml --seeds=3 --concurrent=4 \
          --runs=runs/stack-table --out="$R/stack-table" --budget-s=$(( budget - 20 ))
      else
        python3 -m fastres.tools.stack --config configs/stack-quick.toml --device=cpu --only=baseline --seeds=3 \
          --concurrent=2 --runs=runs/device-dryrun/stack-table --out="$R/stack-table" "${TINY[@]}" --run.epochs=1 \
          --budget-s=$(( budget - 20 ))
      fi ;;
    recipes) stack_item configs/tune-recipe.toml tune-recipe "$budget" onecycle-25-epochs-batch-1024 \
               --data.subset=1280 ;;  # its rows train batches of 1024: one full batch after the 128 held out
    ladder) stack_item configs/stack.toml stack "$budget" baseline ;;
    depths) stack_item configs/depths.toml depths "$budget" resnet-20 ;;
  esac
}

provenance() {  # FILE: what this call runs on (device, torch version, git SHA, code hash), read once, printed
  python3 - "$1" <<'PY'
import json, sys

import torch

from fastres.log import code_hash, device_name, git_sha

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
prov = dict(device=device_name(device), torch_version=torch.__version__, git_sha=git_sha(), code_hash=code_hash())
json.dump(prov, open(sys.argv[1], "w"))
print(f"torch {prov['torch_version']} on {prov['device']}; code {prov['git_sha']} ({prov['code_hash']})")
PY
}

mark_done() {  # NAME PROVENANCE_FILE: results/device/NAME.json, the item's provenance: what ran it, on what, when
  mkdir -p "$R/device"
  python3 - "$R/device/$1.json" "$1" "$2" <<'PY'
import json, sys, time

json.dump(dict(item=sys.argv[2], command=f"bash launch/device.sh next (item {sys.argv[2]})",
               **json.load(open(sys.argv[3])), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
          open(sys.argv[1], "w"), indent=1)
PY
}

plan() {  # the queue with each item's budget and state
  local name total=0 free=0 data=0 budget needs state
  echo "fastres measurement queue${DRY:+ (DRY RUN: CPU, tiny, synthetic data)}; this call:" \
       "$([ "$CALL_BUDGET" -gt 0 ] && echo "at most ${CALL_BUDGET} s" || echo "no time limit (--budget=S sets one)")"
  printf '  %-11s %7s  %-5s %s\n' item budget needs state
  for name in $ITEMS; do
    item_info "$name"
    state=pending
    item_done "$name" && state="done ($R/device/$name.json)"
    [ "$state" != pending ] || [ "$budget" -gt 0 ] || state="skipped (budget 0)"
    printf '  %-11s %5s s  %-5s %s\n' "$name" "$budget" "${needs:--}" "$state"
    if [ "$state" = pending ]; then
      total=$((total + budget))
      if [ -z "$needs" ]; then free=$((free + budget)); else data=$((data + budget)); fi
    fi
  done
  echo "  pending: ${total} s of item budgets: ${free} s need no data set, ${data} s need CIFAR-10" \
       "($(have_data && echo "found at $DATA" || echo "not found at $DATA: pass --data=DIR or set FASTRES_DATA"))"
}

next() {  # run the pending items within the call's budget, packing after each
  local start=$SECONDS name budget needs left b rc runs nodata= log prov
  while [ $# -gt 0 ]; do
    case $1 in
      --data=*) DATA=${1#*=} ;;
      --out=*) OUT_DIR=${1#*=} ;;
      --budget=*) CALL_BUDGET=${1#*=} ;;
      *) die "next: unknown argument '$1' (use --data=DIR --out=DIR --budget=S)" ;;
    esac
    shift
  done
  [[ $CALL_BUDGET =~ ^[0-9]+$ ]] || die "--budget=$CALL_BUDGET: a whole number of seconds (0: no limit)"
  [ -n "$DRY" ] || [ -f .device/git_sha ] || [ -e .git ] || \
    die "no .git and no .device/git_sha: run 'bash launch/device.sh prepare' in your checkout and copy .device/ along"
  have_data && export FASTRES_DATA=$DATA
  export PYTHONUNBUFFERED=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
  # every folder an item writes, checked before any budget is spent on an item whose results could not be kept
  writable "$OUT_DIR" "$R" "$R/device" runs
  while IFS= read -r -d '' dir; do writable "$dir"; done < <(find "$R" -mindepth 1 -type d -print0)
  log=$OUT_DIR/device.log
  plan | tee -a "$log"
  prov=$OUT_DIR/provenance.json
  provenance "$prov" 2>&1 | tee -a "$log"
  for name in $ITEMS; do
    item_info "$name"
    if item_done "$name"; then
      echo "=== $name: done before, skipped" | tee -a "$log"
      continue
    fi
    if [ "$budget" -eq 0 ]; then
      echo "=== $name: budget 0 (BUDGET_$name=0): skipped in this call" | tee -a "$log"
      continue
    fi
    if [ "$needs" = data ] && [ -z "$DRY" ] && ! have_data; then
      [ -n "$nodata" ] || echo "=== $name and the rest need CIFAR-10, not found at $DATA: pass --data=DIR or set" \
                               "FASTRES_DATA to the folder holding cifar-10-batches-py; they wait" | tee -a "$log"
      nodata=1
      continue
    fi
    b=$budget
    if [ "$CALL_BUDGET" -gt 0 ]; then
      left=$((CALL_BUDGET - (SECONDS - start)))
      if [ "$left" -lt 30 ]; then
        echo "=== the call's budget is spent: $name and the rest wait for the next call" | tee -a "$log"
        break
      fi
      b=$((budget < left ? budget : left))
    fi
    echo "=== $name (budget ${b}s) $(date -u +%FT%TZ)" | tee -a "$log"
    set +e
    timeout -k 15 "$b" bash "$0" item "$name" "$b" 2>&1 | tee -a "$log" "$R/device/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    runs=$(stack_runs "$name")  # a ladder item is done when every row of its stack is
    if [ "$rc" = 0 ] && { [ -z "$runs" ] || stack_complete "$runs"; }; then
      mark_done "$name" "$prov"
      echo "=== $name done" | tee -a "$log"
    else
      echo "=== $name not done (exit $rc$([ "$rc" = 124 ] && echo ': out of its budget'); the next call resumes it)" \
        | tee -a "$log"
    fi
    pack >> "$log"  # after every item: a machine lost mid-queue still leaves what finished
    [ "$rc" != 0 ] && [ "$name" = check ] && { echo "=== check failed: the queue stops here" | tee -a "$log"; return 1; }
  done
  return 0
}

cmd=${1:-}; shift || true
case $cmd in
  plan) plan ;;
  next) next "$@" ;;
  prepare) prepare ;;
  unpack) unpack "$@" ;;
  pack) pack ;;
  item) item "$@" ;;
  *) die "usage: launch/device.sh plan | next [--data=DIR] [--out=DIR] [--budget=S] | unpack DIR | prepare | pack" ;;
esac
