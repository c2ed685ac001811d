"""Print results/cpu-ema/README.md's table from the committed metrics: python results/cpu-ema/table.py"""
import json
from pathlib import Path

HERE = Path(__file__).parent
ema = [json.loads(line) for line in (HERE / "alternate-ema0.99" / "metrics.jsonl").open()]
old = [json.loads(line) for line in (HERE.parent / "cpu-tta2" / "alternate" / "metrics.jsonl").open()]
print("| epoch | lr at its end | trained weights (`val_acc_no_ema`) | EMA 0.99 (`val_acc`) | EMA - trained (points) "
      "| results/cpu-tta2 alternate `val_acc` |")
print("|---|---|---|---|---|---|")
for r, o in zip(ema, old):
    print(f"| {r['epoch']} | {r['lr']:.3g} | {r['val_acc_no_ema']:.2%} | {r['val_acc']:.2%} | "
          f"{100 * (r['val_acc'] - r['val_acc_no_ema']):+.2f} | {o['val_acc']:.2%} |")
