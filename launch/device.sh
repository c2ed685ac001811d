#!/usr/bin/env bash
# A GPU session's runbook: the device tool lends one H100 for 30 minutes of device time, 10 minutes a
# command, given back ~30 s after each call, with no CIFAR-10, no DALI and no .git. This script does what
# each call needs, so the session's minutes go to measurements.
#
# Here (the dev machine, repo root):
#   bash launch/device.sh prepare        # stage CIFAR-10 + DALI wheels (.stage/NN), record HEAD in .device/;
#                                        # prints the staging calls to make back to back
#   bash launch/device.sh unpack DIR     # after a call: DIR = its files_at; puts results/ and runs/ back here
# There (device `run`, carry [".device", ...], after the staging calls, on the still-warm machine):
#   bash launch/device.sh run check               # phases in order, logged; $OUT/back.tgz packed after each
#   bash launch/device.sh run bench
#   bash launch/device.sh run loaders scaling     # phases whose budgets sum to under 600 s share a call
#   bash launch/device.sh run stack=480           # a phase with its time budget in seconds
#
# Phases and their default budgets (a phase is stopped at its budget; a call has 600 s in all):
#   check    300 s  the tests only a GPU can run (tests/test_cuda.py) and the DALI tests; stops the call on failure
#   bench    420 s  fast.toml: img/s, s/epoch, vs baseline, vs floor, time to 91% (results/bench.json)
#   steps    330 s  the fast path step by step, a bench row per technique added (launch/fastpath.sh)
#   final    240 s  fast.toml + the keys `fastres.report --pick` chose from the tune runs (validation split),
#                   with time to 91% on test: the row that checks the tuned recipe (label fast-tuned)
#   graph    540 s  fast.toml with the whole step as one CUDA graph (precision.step_graph, compile mode default):
#                   a bench row with time to 91% (label fast+step-graph), and its scaling model
#                   (results/scaling-step-graph.md); run `check` first, which tests the graph's capture
#   loaders  240 s  each loader alone and in a training epoch (results/loaders.json)
#   scaling  150 s  the scaling model's GPU table (results/scaling.md)
#   stack=S       the ladder for S seconds, resuming (results/stack.*)
#   tune=S        configs/tune-fast.toml for S seconds (validation split only; runs/tune-fast/report)
#   depths=S      the paper's depths for S seconds, resuming (results/resnet-depths.*)
#   STACK_ONLY=slug,slug  (environment) the stack phases run only these rows
# Open GPU work (issue 7), in order, about 25 of the 30 device minutes: `run check` (the step graph's capture
# has never run on a GPU; expect to debug), `run graph`, then with carry [".device", "runs/tune-fast"]:
#   STACK_ONLY=30-epochs-alt-flip-tta2-ema,40-epochs-alt-flip-tta2-ema,50-epochs-alt-flip-tta2-ema,50-epochs-tta2 ... run tune=480
# then `run final` (and `run scaling` for the weak-scaling table, if minutes are left).
# Runs that are not finished keep their checkpoints in back.tgz; `unpack` puts them under runs/ and the next
# call carries them (carry ["runs/stack"]) so the ladder resumes on a fresh machine.
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
  bash ../shared/device/stage.sh ${STAGE_PARTS:-data dali}
  echo "Then, carry [\".device\"]: 'bash launch/device.sh run check', 'run bench', 'run loaders scaling', 'run stack=480'"
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
  find results -type f > "$list"
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

cmd=${1:-}; shift || true
case $cmd in
  prepare) prepare ;;
  unpack) unpack "$@" ;;
  run) run "$@" ;;
  pack) pack ;;
  *) die "usage: launch/device.sh prepare | run PHASE... | unpack FILES_AT | pack" ;;
esac
