#!/usr/bin/env bash
# A GPU session's runbook. The device tool lends one H200 for 15 minutes of device time per issue in all (machine
# start, idle time and every call count; 10 minutes a command; 64 MiB carried per call; given back ~30 s after a
# call); there is no CIFAR-10, no DALI and no .git there. Whoever draws a GPU runs the queue, nothing to decide:
#
# Here (the dev machine, repo root):
#   bash launch/device.sh plan           # the queue: each item's budget, done or not, and the 15-minute arithmetic
#   bash launch/device.sh prepare        # record HEAD in .device/ (carry it); STAGE_PARTS=data also cuts CIFAR-10
#                                        # into 3 carried parts and prints the 3 staging calls
#   bash launch/device.sh unpack DIR     # after a call: DIR = its files_at; puts results/ and runs/ back here
# There (device `run`, carry [".device"]):
#   bash launch/device.sh next           # call 1 (<= 9 min): the first pending items that need no data set
#   (the 3 staging calls, back to back; the last one ends with "&& bash launch/device.sh next")
#                                        # call 4: the items that need CIFAR-10, resuming what a budget stopped
# The queue, in priority order (an item is done when results/device/<item>.json exists: commit it with results/):
#   check      120 s  tests/test_cuda.py: the step graph's capture, the fast loop without host syncs
#   throughput 180 s  fast.toml on synthetic data, with and without precision.step_graph, batch 512 and 1024,
#                     each beside the same-process baseline and the floor measured there (results/bench.json)
#   profile    120 s  where a step's time goes, three of those variants (results/profile/*.txt)
#   quick      330 s  [data] configs/stack-quick.toml: the ladder on 10 epochs, each run stopped at 80% test
#   recipes    400 s  [data] configs/tune-recipe.toml: 8 recipe rows on the validation split
#   ladder     540 s  [data] configs/stack.toml, resuming          depths  540 s  [data] configs/depths.toml
# BUDGET_<item>=S overrides an item's budget, NEXT_BUDGET_S (540) a call's. FASTRES_DEVICE_DRYRUN=1 walks the
# queue on a CPU (tiny runs, synthetic data, results under runs/device-dryrun/) to test it.
# Older phases, one by one: bash launch/device.sh run check|bench|steps|final|graph|loaders|scaling|stack=S|...
# Runs that are not finished keep their checkpoints in back.tgz; `unpack` puts them under runs/ and the next
# call carries them (carry ["runs/stack-quick"], say) so a ladder resumes on a fresh machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

die() { echo "launch/device.sh: $*" >&2; exit 2; }

prepare() {
  mkdir -p .device
  local sha dirty
  sha=$(git rev-parse HEAD)
  dirty=$(git status --porcelain --untracked-files=no -- fastres configs)
  echo "$sha${dirty:+-dirty}" > .device/git_sha  # provenance.git_sha() reads it where .git is absent
  python3 -c "from fastres import provenance; print(provenance.code_hash())" > .device/code_hash  # for this code only
  echo "device runs will record git_sha $(cat .device/git_sha) (code hash $(cat .device/code_hash))"
  mkdir -p "$(git rev-parse --git-dir)/info"  # stage.sh adds .stage/ to info/exclude, which a fresh clone may lack
  if [ -n "${STAGE_PARTS:-}" ]; then
    bash ../shared/device/stage.sh $STAGE_PARTS  # data (3 parts); dali only for a DALI row
  fi
  echo "Then, carry [\".device\"]: 'bash launch/device.sh next' (no data needed); staging: STAGE_PARTS=data"
}

unpack() {
  local dir=${1:?usage: launch/device.sh unpack FILES_AT}
  [ -f "$dir/back.tgz" ] || die "no back.tgz in $dir"
  tar -xzf "$dir/back.tgz" -C "$root"
  echo "unpacked: $(tar -tzf "$dir/back.tgz" | grep -c .) entries into results/ and runs/"
  [ -f "$dir/device.log" ] && tail -n 5 "$dir/device.log"
  git status --short results
}

pack() {  # results/ and runs/, less the checkpoints of finished runs (summary.json beside them)
  local out=${OUT:-/tmp/out} list
  mkdir -p "$out"
  list=$(mktemp)
  : > "$list"
  [ ! -d results ] || find results -type f >> "$list"
  if [ -d runs ]; then
    find runs -type f ! -name checkpoint.pt >> "$list"
    find runs -name checkpoint.pt | while read -r c; do
      [ -f "$(dirname "$c")/summary.json" ] || echo "$c"
    done >> "$list"
  fi
  tar -czf "$out/back.tgz" -T "$list"
  echo "packed $(wc -l < "$list") files: $(du -h "$out/back.tgz" | cut -f1) in $out/back.tgz"
}

PHASES="check, bench, steps, final, graph, loaders, scaling, stack=S, tune=S, depths=S"

# Phase NAME: sets argv (its command) and budget (its default seconds); fails for a name that is not one.
phase_command() {
  case $1 in
    check) budget=300 argv=(python3 -m pytest -q -x tests/test_cuda.py tests/test_dali.py) ;;
    bench) budget=420 argv=(python3 -m fastres.bench --config configs/fast.toml --time-to-target) ;;
    steps) budget=330 argv=(bash launch/fastpath.sh) ;;
    final) budget=240 argv=(bash -c 'f=$(python3 -m fastres.report --runs=runs/tune-fast --pick) && set -x &&
      python3 -m fastres.bench --config configs/fast.toml --label=fast-tuned --time-to-target $f') ;;
    graph) budget=540 argv=(bash -c 'g="--precision.compile_mode=default --precision.step_graph=true" && set -x &&
      python3 -m fastres.bench --config configs/fast.toml --label=fast+step-graph --time-to-target $g &&
      python3 -m fastres.bench --what scaling --config configs/fast.toml --gloo-procs=1 $g \
        --out=results/scaling-step-graph.md') ;;
    loaders) budget=240 argv=(python3 -m fastres.bench --what loaders --config configs/bench-loaders.toml) ;;
    scaling) budget=150 argv=(python3 -m fastres.bench --what scaling --config configs/fast.toml) ;;
    stack) budget=500 argv=(python3 -m fastres.stack --config configs/stack.toml) ;;
    tune) budget=500 argv=(python3 -m fastres.stack --config configs/tune-fast.toml) ;;
    depths) budget=500 argv=(python3 -m fastres.stack --config configs/depths.toml) ;;
    *) return 1 ;;
  esac
}

phase() {  # name[=budget_s]: at most budget seconds (a call has 600 in all)
  local name=${1%%=*} budget argv limit
  phase_command "$name"
  [ "$1" = "$name" ] || budget=${1#*=}
  limit=$budget
  if [ "${argv[2]:-}" = fastres.stack ]; then
    # the ladders stop themselves at the budget (an unfinished run keeps its checkpoint); timeout is a backstop
    argv+=(--budget-s="$budget") limit=$((budget + 60))
    [ -z "${STACK_ONLY:-}" ] || argv+=(--only="$STACK_ONLY")  # rows (slugs, comma-separated) to run, in file order
  fi
  echo "=== $name (budget ${budget}s) $(date -u +%FT%TZ)"
  timeout -k 15 "$limit" "${argv[@]}"
}

run() {
  [ $# -gt 0 ] || die "name phases: $PHASES"
  local p budget argv prc
  for p in "$@"; do phase_command "${p%%=*}" || die "unknown phase '$p' ($PHASES)"; done
  local data=${FASTRES_DATA:-/root/payload/cifar-10-batches-py}
  [ -d "$data" ] || die "no CIFAR-10 at $data: make the staging calls 'launch/device.sh prepare' printed first"
  [ -f .device/git_sha ] || [ -e .git ] || die "no .device/git_sha: run 'launch/device.sh prepare' here and carry .device"
  export FASTRES_DATA=$data PYTHONUNBUFFERED=1 PYTHONPATH=/root/site:$root${PYTHONPATH:+:$PYTHONPATH}
  local out=${OUT:-/tmp/out} rc=0
  mkdir -p "$out"
  set +e
  (
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo "dali: not importable"
    for p in "$@"; do
      prc=0
      phase "$p" || prc=$?
      [ "$prc" = 0 ] || { rc=$prc; echo "=== $p failed (exit $prc$([ "$prc" = 124 ] && echo ': out of its time budget'))"; }
      pack  # after every phase: a call killed at its limit still brings back what finished
      [ "$prc" != 0 ] && [ "${p%%=*}" = check ] && break  # a broken fast path is not worth benchmarking
    done
    exit "$rc"
  ) 2>&1 | tee -a "$out/device.log"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

# ------------------------------------------------------------------------------------------ the queue
ITEMS="check throughput profile quick recipes ladder depths"
DRY=${FASTRES_DEVICE_DRYRUN:-}
R=results  # where results and the done marks go; a dry run keeps its own apart from the real ones
[ -z "$DRY" ] || R=runs/device-dryrun/results
DATA=${FASTRES_DATA:-/root/payload/cifar-10-batches-py}

item_info() {  # NAME: sets budget (seconds; BUDGET_<NAME> overrides) and needs ("data" or empty)
  case $1 in
    check) budget=120 needs= ;;
    throughput) budget=180 needs= ;;
    profile) budget=120 needs= ;;
    quick) budget=330 needs=data ;;
    recipes) budget=400 needs=data ;;
    ladder) budget=540 needs=data ;;
    depths) budget=540 needs=data ;;
    *) return 1 ;;
  esac
  local var="BUDGET_$1"
  budget=${!var:-$budget}
}

item_done() { [ -f "$R/device/$1.json" ]; }

# The step forms throughput and profile measure: label|flags on top of configs/fast.toml.
VARIANTS=("b512-reduce-overhead|" "b512-step-graph|--precision.step_graph=true --precision.compile_mode=default"
          "b1024-reduce-overhead|--optim.batch_size=1024"
          "b1024-step-graph|--optim.batch_size=1024 --precision.step_graph=true --precision.compile_mode=default")
# A dry run: the same commands, CPU-sized (ResNet-8, batches of 64 and 128, no compile, no autocast).
TINY=(--run.device=cpu --data.source=synthetic --data.subset=1024 --data.val_size=128 --data.test_subset=128 --model.depth=8
      --precision.compile=false --precision.amp=off --data.num_workers=0)

stack_item() {  # CONFIG RUNS_NAME ITEM_BUDGET [DRY_ROWS]: a ladder within the item's budget, resuming
  local extra=() stop=$(( $3 > 40 ? $3 - 20 : $3 / 2 + 1 ))  # the ladder stops itself before the item's timeout
  [ -z "$DRY" ] || extra=(--device=cpu --only="$4" --seeds=1 --runs=runs/device-dryrun/"$2" --out="$R/$2" "${TINY[@]}"
                          --run.epochs=1)
  python3 -m fastres.stack --config "$1" --budget-s="$stop" "${extra[@]}"
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
        [ -z "$DRY" ] || flags=${flags//=1024/=128}
        # shellcheck disable=SC2086  # flags are several words
        if [ "$name" = throughput ]; then
          python3 -m fastres.bench --config configs/fast.toml --data.source=synthetic --label="fast $label synthetic" \
            --out="$R/bench.json" ${DRY:+--steps=2 --warmup=1} ${DRY:+"${TINY[@]}"} "${dry_batch[@]}" $flags || rc=$?
        else
          python3 -m fastres.bench --what profile --config configs/fast.toml --data.source=synthetic \
            --label="fast-$label" --out="$R/profile" ${DRY:+--steps=2} ${DRY:+"${TINY[@]}"} "${dry_batch[@]}" $flags \
            || rc=$?
        fi
      done
      return "$rc" ;;
    quick) stack_item configs/stack-quick.toml stack-quick "$budget" baseline,plus-bf16-amp ;;
    recipes) stack_item configs/tune-recipe.toml tune-recipe "$budget" onecycle-25-epochs-batch-1024 ;;
    ladder) stack_item configs/stack.toml stack "$budget" baseline ;;
    depths) stack_item configs/depths.toml depths "$budget" resnet-20 ;;
  esac
}

mark_done() {  # NAME: results/device/NAME.json, the item's provenance: what ran it, on what, when
  mkdir -p "$R/device"
  python3 - "$R/device/$1.json" "$1" <<'PY'
import json, sys, time

import torch

from fastres import provenance

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
json.dump(dict(item=sys.argv[2], command=f"bash launch/device.sh next (item {sys.argv[2]})",
               device=provenance.device_name(device), torch_version=torch.__version__, git_sha=provenance.git_sha(),
               code_hash=provenance.code_hash(), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
          open(sys.argv[1], "w"), indent=1)
PY
}

plan() {  # the queue with each item's budget and state, and the 15-minute arithmetic
  local name total=0 first=0 rest=0 budget needs state
  echo "fastres device queue${DRY:+ (DRY RUN: CPU, tiny)}: an H200 lends 15 min of device time per issue in all;" \
       "a call <= ${NEXT_BUDGET_S:-540} s"
  printf '  %-11s %7s  %-5s %s\n' item budget needs state
  for name in $ITEMS; do
    item_info "$name"
    state=pending
    item_done "$name" && state="done ($R/device/$name.json)"
    printf '  %-11s %5s s  %-5s %s\n' "$name" "$budget" "${needs:--}" "$state"
    if [ "$state" = pending ]; then
      total=$((total + budget))
      if [ -z "$needs" ]; then first=$((first + budget)); else rest=$((rest + budget)); fi
    fi
  done
  echo "  pending: ${total} s of item budgets: ${first} s need no data (call 1), ${rest} s need CIFAR-10 (after the"
  echo "  3 staging calls). 15 min = machine start (~2-3 min) + call 1 (<= ${first} s) + staging (~1 min) + what is"
  echo "  left for the data items; a budget stops an item, packs what finished, and the next session resumes it."
}

next() {  # run the first pending items within one call's budget, packing after each
  local call=${NEXT_BUDGET_S:-540} start=$SECONDS name budget needs left b rc runs out=${OUT:-/tmp/out}
  [ -n "$DRY" ] || [ -f .device/git_sha ] || [ -e .git ] || \
    die "no .device/git_sha: run 'launch/device.sh prepare' here and carry .device"
  export FASTRES_DATA=$DATA PYTHONUNBUFFERED=1 PYTHONPATH=/root/site:$root${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p "$out" "$R/device"
  plan | tee -a "$out/device.log"
  for name in $ITEMS; do
    item_info "$name"
    if item_done "$name"; then
      echo "=== $name: done before, skipped" | tee -a "$out/device.log"
      continue
    fi
    if [ "$needs" = data ] && [ -z "$DRY" ] && [ ! -d "$DATA" ]; then
      echo "=== $name and the rest need CIFAR-10 at $DATA: make the staging calls (STAGE_PARTS=data bash" \
           "launch/device.sh prepare prints them), the last one ending in '&& bash launch/device.sh next'" \
        | tee -a "$out/device.log"
      break
    fi
    left=$((call - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
      echo "=== the call's budget is spent: $name and the rest wait for the next call" | tee -a "$out/device.log"
      break
    fi
    b=$((budget < left ? budget : left))
    echo "=== $name (budget ${b}s) $(date -u +%FT%TZ)" | tee -a "$out/device.log"
    set +e
    timeout -k 15 "$b" bash "$0" item "$name" "$b" 2>&1 | tee -a "$out/device.log" "$R/device/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    runs=$(stack_runs "$name")  # a ladder item is done when every row of its stack is
    if [ "$rc" = 0 ] && { [ -z "$runs" ] || stack_complete "$runs"; }; then
      mark_done "$name"
      echo "=== $name done" | tee -a "$out/device.log"
    else
      echo "=== $name not done (exit $rc$([ "$rc" = 124 ] && echo ': out of its budget'); the next call resumes it)" \
        | tee -a "$out/device.log"
    fi
    pack >> "$out/device.log"  # after every item: a call killed at its limit still brings back what finished
    [ "$rc" != 0 ] && [ "$name" = check ] && { echo "=== check failed: the queue stops here" | tee -a "$out/device.log"; return 1; }
  done
  return 0
}

stack_runs() {  # ITEM: its stack's runs directory name
  case $1 in quick) echo stack-quick ;; recipes) echo tune-recipe ;; ladder) echo stack ;; depths) echo depths ;; esac
}

cmd=${1:-}; shift || true
case $cmd in
  prepare) prepare ;;
  unpack) unpack "$@" ;;
  run) run "$@" ;;
  pack) pack ;;
  plan) plan ;;
  next) next ;;
  item) item "$@" ;;
  *) die "usage: launch/device.sh plan | prepare | next | unpack FILES_AT | run PHASE... | pack" ;;
esac
