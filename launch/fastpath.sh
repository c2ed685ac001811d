#!/usr/bin/env bash
# The fast path measured step by step: one `fastres.tools.bench train` row per step, each step adding one
# technique to the previous ones, starting from the baseline (He et al. 2015's ResNet-20 recipe,
# configs/baseline.toml). Rows go to results/bench.json labelled "step N: ..."; each row also measures
# the baseline in the same process, so its speed-up is against a baseline timed minutes apart, not days
# (step 0 is the baseline against itself: its ratio is the run-to-run noise). A step that fails is
# reported and the ladder goes on (the rows after it still have its flags).
#   bash launch/fastpath.sh [--steps=200 --warmup=30] [--data.dir=...]
set -uo pipefail
cd "$(dirname "$0")/.."
extra=("$@")
[ ${#extra[@]} -gt 0 ] || extra=(--steps=200 --warmup=30)
ladder=(
  "step 0: baseline (workers, fp32, batch 128)|"
  "step 1: + GPU-resident data, on-device augmentation|--data.loader=gpu"
  "step 2: + batch 512, linear LR scaling|--optim.batch_size=512"
  "step 3: + bf16 autocast|--precision.amp=bf16"
  "step 4: + channels_last|--precision.channels_last=true"
  "step 5: + fused SGD|--optim.impl=fused"
  "step 6: + torch.compile|--precision.compile=true"
  "step 7: + CUDA graphs (compile mode reduce-overhead)|--precision.compile_mode=reduce-overhead"
  "step 8: + batch 1024|--optim.batch_size=1024"
  "step 9: + the whole step as one CUDA graph (compile mode default inside it)|--precision.compile_mode=default --precision.step_graph=true"
)
flags=() rc=0
for entry in "${ladder[@]}"; do
  label=${entry%%|*}
  read -ra added <<< "${entry#*|}"  # a step may add several flags, separated by spaces
  flags+=("${added[@]}")
  echo "--- $label: ${flags[*]}"
  python3 -m fastres.tools.bench train --config configs/baseline.toml --label="$label" "${extra[@]}" "${flags[@]}" \
    || { rc=1; echo "--- $label failed"; }
done
exit $rc
