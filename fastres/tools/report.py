"""The speed/accuracy table, from run summaries only: ``python -m fastres.tools.report [--runs DIR] [--out DIR]``.

Reads the stack manifest (``<runs>/stack.json``, written by fastres.tools.stack) for the rows and their run
directories, then each run's summary.json and metrics.jsonl, and writes to ``--out``:
- stack.md: the table users read (also pasted into the README from results/);
- stack.csv: the same numbers, one row per combination;
- stack.png: time to target per combination (mean, error bar = std over seeds), and accuracy against
  training wall-clock for every run.
Accuracy is test accuracy, except for stacks whose runs measure the validation split (eval.on_test = false,
for tuning): then every number is on the validation split and the columns say so.
A time is reported only when every seed of a row reached the target; otherwise the row says how many did.
Rows that need more GPUs than the machine had say so and carry no number. Nothing here is typed by hand.

``--pick`` (for a tuning stack on the validation split) prints instead the chosen row's keys as override
flags, by a rule fixed before any run: the smallest mean time to target among rows every seed of which
reached it; if none did, the highest mean final accuracy. Keys that only make it a tuning run
(data.val_size, eval.on_test, run.eval_every) are left out, so the flags apply to the recipe itself.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fastres.errors import UserError, entry, read_json, writing
from fastres.log import EXTRA_ACCS, SUMMARY, read_metrics, short_sha
from fastres.tools import Parser, parser

MANIFEST = "stack.json"  # in a stack's runs directory: its rows, as fastres.tools.stack last wrote them
SHARED = "shared_device"  # in a run's summary.json: the runs it shared its device with (fastres.tools.stack)
DERIVED_TOLERANCE = 0.05  # derived times are shown only while every row measured both ways agrees within this
LAST_STACK = "runs/.last-stack"  # the runs directory of the last stack (written beside it, in its parent), a path
_WORD = {"test": "test", "val": "validation"}
CSV_COLUMNS = ["combination", "group", "status", "device", "world_size", "seeds", "seeds_reached", "target_acc",
               "time_to_target_s_mean", "time_to_target_s_std", "final_test_acc_mean", "final_test_acc_std",
               "epochs_to_target_mean", "time_source", "time_measured_s", "time_derived_s", "img_per_s",
               "speedup_vs_baseline", "git_sha", "code_hash",
               "torch_version", "note"]


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)  # no spread from one seed


MANIFEST_ROW_KEYS = frozenset({"name", "group", "nproc", "seeds", "status", "runs"})  # each row, for the report
_SUMMARY_KEYS = {"time_to_target_s", "target_acc", "device", "world_size", "img_per_s", "git_sha", "torch_version",
                 "epochs_to_target"}


def _joined(values) -> str:
    return " / ".join(sorted({str(v) for v in values if v is not None}))


def collect(runs_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, one aggregate per row) from the manifest and the runs' summaries."""
    runs_dir = Path(runs_dir)
    path = runs_dir / MANIFEST
    if not path.exists():
        raise UserError(f"no {path}: run python -m fastres.tools.stack first (or pass --runs=DIR of a stack's runs)")
    manifest = read_json(path, dict, "fastres.tools.stack manifest")
    if not isinstance(manifest.get("rows"), list) or not all(
            isinstance(r, dict) and MANIFEST_ROW_KEYS <= set(r) and isinstance(r["runs"], list)
            for r in manifest["rows"]):
        raise UserError(f"{path} is not a fastres.tools.stack manifest (it needs 'rows', each with "
                        f"{', '.join(sorted(MANIFEST_ROW_KEYS))}): rerun fastres.tools.stack to rewrite it")
    rows = []
    for row in manifest["rows"]:
        summaries, curves = [], []
        for run in row["runs"]:
            try:  # a run not started, or killed before its summary: not counted
                s = read_json(Path(run) / SUMMARY)
            except UserError:
                continue
            if s.get("finished"):
                missing = (_SUMMARY_KEYS | {f"final_{s.get('target_split', 'test')}_acc"}) - set(s)
                if missing:
                    raise UserError(f"{Path(run) / SUMMARY} lacks {', '.join(sorted(missing))}: "
                                    f"not a summary fastres.train wrote; rerun that row")
                summaries.append(s)
                curves.append(read_metrics(run))
        reached = [s for s in summaries if s["time_to_target_s"] is not None]
        complete = len(summaries) == row["seeds"]
        all_reached = complete and len(reached) == len(summaries)
        # a run's clock counts only where it had the device alone (fastres.tools.stack --concurrent)
        alone = [s for s in summaries if not (s.get(SHARED) or {}).get("others")]
        t_mean, t_std = _mean_std([s["time_to_target_s"] for s in alone]) if (
            all_reached and alone) else (None, None)
        speed = _speed_run(row)
        derived = _derived(speed, reached) if all_reached else None
        split = summaries[0].get("target_split", "test") if summaries else "test"
        a_mean, a_std = _mean_std([s[f"final_{split}_acc"] for s in summaries])
        note = row.get("note", "")
        for key, what in EXTRA_ACCS.items():  # what the same evaluations gave without TTA, EMA, precise BN
            values = [s.get(f"final_{split}_acc_{key}") for s in summaries]
            if summaries and None not in values:
                note = "; ".join(filter(None, [note, f"{what}: {statistics.fmean(values):.2%}"]))
        status = row["status"]
        if status.startswith("needs"):
            shown = status
        elif not summaries:
            shown = "not run"
        elif not complete:
            shown = f"{len(summaries)}/{row['seeds']} seeds run"
        elif not reached:
            shown = "never reached"
        elif len(reached) < len(summaries):
            shown = f"{len(reached)}/{len(summaries)} seeds reached"
        else:
            shown = "done"
        rows.append(dict(
            combination=row["name"], group=row["group"], status=shown, note=note,
            nproc=row["nproc"], seeds=len(summaries), seeds_planned=row["seeds"], seeds_reached=len(reached),
            target_acc=summaries[0]["target_acc"] if summaries else None,
            device=_joined(s["device"] for s in summaries), world_size=_joined(s["world_size"] for s in summaries),
            time_to_target_s_mean=t_mean, time_to_target_s_std=t_std,
            split=split, final_acc_mean=a_mean, final_acc_std=a_std,
            epochs_to_target_mean=statistics.fmean([s["epochs_to_target"] for s in reached])
            if all_reached and reached else None,
            time_measured_s=t_mean, time_derived_s=derived, timed_alone=len(alone),
            # a rate is a clock too: from the runs alone, else the speed run's
            img_per_s=statistics.fmean([s["img_per_s"] for s in alone]) if alone else (
                speed["img_per_s"] if speed and summaries else None),
            git_sha=_joined(short_sha(s["git_sha"]) for s in summaries),
            code_hash=_joined(s.get("code_hash") for s in summaries),
            torch_version=_joined(s["torch_version"] for s in summaries), curves=curves, speedup_vs_baseline=None,
            depth=summaries[0].get("config", {}).get("model", {}).get("depth") if summaries else None,
            params=summaries[0].get("params") if summaries else None,
            test_errs=[100 * (1 - s["final_test_acc"]) for s in summaries if s.get("final_test_acc") is not None]))
    # where a row has both, the derived time is checked against the measured one; past DERIVED_TOLERANCE on any
    # row, no row of the table shows a derived time
    both = [r for r in rows if r["time_measured_s"] and r["time_derived_s"]]
    worst = max((r["time_derived_s"] / r["time_measured_s"] - 1 for r in both), key=abs, default=None)
    trusted = worst is not None and abs(worst) <= DERIVED_TOLERANCE
    manifest["derived_check"] = dict(rows=[(r["combination"], r["time_measured_s"], r["time_derived_s"]) for r in both],
                                     worst=worst, trusted=trusted)
    for r in rows:
        r["time_source"] = "measured" if r["time_measured_s"] is not None else (
            "derived" if r["time_derived_s"] is not None and trusted else None)
        if r["time_source"] == "derived":
            r["time_to_target_s_mean"], r["time_to_target_s_std"] = r["time_derived_s"], None
    base = rows[0] if rows else None
    for r in rows:
        if base and base["time_to_target_s_mean"] and r["time_to_target_s_mean"]:
            r["speedup_vs_baseline"] = base["time_to_target_s_mean"] / r["time_to_target_s_mean"]
    return manifest, rows


def _speed_run(row: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the row's speed run (fastres.tools.stack --concurrent: its config alone, a short run), if it
    finished alone."""
    try:
        speed = read_json(Path(row["speed"]) / SUMMARY) if row.get("speed") else None
    except UserError:
        return None
    if not speed or not speed.get("finished") or not speed.get("steps") or (speed.get(SHARED) or {}).get("others"):
        return None
    return speed


def _derived(speed: dict[str, Any] | None, reached: list[dict[str, Any]]) -> float | None:
    """Epochs to target (every seed, shared or alone) x steps an epoch x the step time the row's speed run
    measured alone; None without one."""
    if speed is None or not reached:
        return None
    step_s = speed["train_time_s"] / speed["steps"]
    steps_per_epoch = reached[0]["steps"] / max(1, reached[0]["epochs_trained"])
    return statistics.fmean([s["epochs_to_target"] for s in reached]) * steps_per_epoch * step_s


def packing(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What packing gained (fastres.tools.stack --concurrent): the packed runs' images over the wall-clock seconds
    they took together, against the rows' speed runs' images over theirs, one at a time (start-up and evaluation
    included in both), and the derived-vs-measured check; None without packed runs."""
    p = manifest.get("packing")
    if not p or not p.get("packed_s"):
        return None
    packed = p["packed_images"] / p["packed_s"]
    alone = p["alone_images"] / p["alone_s"] if p.get("alone_s") else None
    check = manifest.get("derived_check", {})
    device = _joined(r["device"] for r in rows if r["device"])
    return dict(concurrent=p["concurrent"], mps=p.get("mps", False), device=device, packed_images=p["packed_images"],
                packed_s=p["packed_s"], alone_images=p.get("alone_images"), alone_s=p.get("alone_s"),
                packed_img_per_s=packed, alone_img_per_s=alone, speedup=packed / alone if alone else None,
                largest_derived_vs_measured=check.get("worst"), derived_trusted=check.get("trusted"),
                rows_measured_both_ways=check.get("rows", []))


def split_of(rows: list[dict[str, Any]]) -> str:
    """"test", or "val" when the runs were tuning runs that never looked at the test set."""
    splits = {r["split"] for r in rows if r["seeds"]}
    return "val" if splits == {"val"} else "test"


def _fmt(v, spec: str, none: str = "") -> str:
    return none if v is None else format(v, spec)


def _time(r: dict[str, Any]) -> str:
    if r.get("time_source") == "derived":
        return f"{r['time_to_target_s_mean']:.1f} (derived)"
    if r["time_to_target_s_mean"] is None and r.get("time_derived_s") is not None and r["status"] == "done":
        return "not measured alone"
    if r["time_to_target_s_mean"] is None:
        return r["status"]
    std = r["time_to_target_s_std"]
    return f"{r['time_to_target_s_mean']:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def _ranks(rows: list[dict[str, Any]]) -> str:
    """The column of ranks: GPUs, or processes where a row ran on CPUs."""
    return "processes" if any(str(r.get("device") or "").startswith("CPU") for r in rows) else "GPUs"


def markdown(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    target = next((r["target_acc"] for r in rows if r["target_acc"] is not None), None)
    tgt = f"{target:.0%}" if target is not None else "target"
    lines = [
        f"# {manifest['name']}: time to {tgt} {_WORD[split_of(rows)]} accuracy",
        "",
        f"Training wall-clock seconds (device-synchronized, evaluation excluded) until the first evaluation at "
        f"or above {tgt}; mean ± std over seeds, each row a fixed recipe. Speed-up is against the first row. "
        f"Built by `python -m fastres.tools.report` from the runs' summary.json files.",
        "",
        f"| combination | {_ranks(rows)} | seeds | time to {tgt} (s) | speed-up | epochs to {tgt} | final "
        f"{split_of(rows)} acc"
        " | img/s "
        f"| device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "" if r["final_acc_mean"] is None else f"{r['final_acc_mean']:.2%}"
        if r["final_acc_std"] is not None:
            acc += f" ± {r['final_acc_std']:.2%}"
        name = r["combination"] + (" *(alone)*" if r["group"] == "alone" else "")
        lines.append(f"| {name} | {r['nproc']} | {r['seeds']}/{r['seeds_planned']} | {_time(r)} | "
                     f"{_fmt(r['speedup_vs_baseline'], '.2f')}{'x' if r['speedup_vs_baseline'] else ''} | "
                     f"{_fmt(r['epochs_to_target_mean'], '.1f')} | {acc} | {_fmt(r['img_per_s'], ',.0f')} | "
                     f"{r['device']} |")
    lines += _derived_lines(manifest, rows)
    notes = [f"- {r['combination']}: {r['note']}" for r in rows if r["note"]]
    prov = sorted({(r["git_sha"], r["code_hash"], r["torch_version"]) for r in rows if r["git_sha"]})
    lines += ["", *(["Notes:", *notes, ""] if notes else []),
              "Provenance (git SHA / code hash / torch): " + "; ".join(" / ".join(p) for p in prov) if prov else ""]
    return "\n".join(lines).rstrip() + "\n"


def _derived_lines(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The lines under the table on derived times and packing (fastres.tools.stack --concurrent); none without."""
    check, lines = manifest.get("derived_check") or {}, []
    if any(r["time_derived_s"] is not None for r in rows):
        lines.append("")
        if check.get("trusted"):
            lines.append("(derived): the row's runs shared the device with others, so their clocks do not count; its "
                         "time is its epochs to target x steps an epoch x the step time a short run of its config "
                         "measured alone. Rows measured both ways:")
        else:
            why = (f"on a row measured both ways they differed by {check['worst']:+.1%}, more than "
                   f"{DERIVED_TOLERANCE:.0%}" if check.get("worst") is not None else "no row was measured both ways "
                   "to check them against")
            lines.append(f"Derived times are not shown ({why}): rows whose runs all shared the device read \"not "
                         "measured alone\". Rows measured both ways:")
        lines += [f"- {name}: measured {m:.1f} s, derived {d:.1f} s ({d / m - 1:+.1%})" for name, m, d in
                  check.get("rows", [])] or ["- none"]
    gain = packing(manifest, rows)
    if gain:
        alone = f"{gain['alone_img_per_s']:,.0f} img/s for one run alone" if gain["alone_img_per_s"] else "no run alone"
        lines += ["", f"Packed: up to {gain['concurrent']} runs at once{' under MPS' if gain['mps'] else ''} trained "
                      f"{gain['packed_img_per_s']:,.0f} img/s in all, against {alone}"
                      + (f": {gain['speedup']:.2f}x" if gain["speedup"] else "")
                      + " (images over wall-clock seconds, process start-up and evaluation included)."]
    return lines


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """CSV_COLUMNS; on a validation-split stack the accuracy columns are named final_val_acc_*."""
    split = split_of(rows)
    names = [c.replace("test", split) for c in CSV_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in rows:
            values = {**r, "final_test_acc_mean": r["final_acc_mean"], "final_test_acc_std": r["final_acc_std"]}
            w.writerow(["" if values.get(k) is None else values.get(k) for k in CSV_COLUMNS])


def stack_figure(manifest: dict[str, Any], rows: list[dict[str, Any]]):
    """stack.png's figure: time to target per combination (left) and accuracy (%) against training wall-clock for
    every run (right), each panel titled, under the stack's name (a matplotlib Figure, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, max(4.0, 0.45 * len(rows) + 1.8)))
    ax1, ax2 = fig.subplots(1, 2)
    names = [r["combination"] + (" (alone)" if r["group"] == "alone" else "") for r in rows]
    colors = [f"C{i % 10}" for i in range(len(rows))]
    target = next((r["target_acc"] for r in rows if r["target_acc"] is not None), None)
    tgt = f"{target:.0%}" if target is not None else "target"
    split = _WORD[split_of(rows)]
    fig.suptitle(manifest["name"])
    _time_bars(ax1, rows, names, colors)
    ax1.set_title(f"time to {tgt} {split} accuracy")
    ax1.set_xlabel(f"training seconds to {tgt} {split} accuracy (mean ± std over seeds)")
    key = f"{split_of(rows)}_acc"
    for color, r, name in zip(colors, rows, names):
        for k, curve in enumerate(r["curves"]):
            pts = [(m["train_time_s"], 100 * m[key]) for m in curve if m.get(key) is not None]
            ax2.plot(*zip(*pts) if pts else ([], []), color=color, lw=1, marker=".", ms=3, alpha=0.8,
                     label=name if k == 0 else None)
    if target is not None:
        ax2.axhline(100 * target, color="k", ls="--", lw=0.8, label=f"target {tgt}")
    ax2.set_title(f"{split} accuracy against training time, every run")
    ax2.set_xscale("log")
    _plain_log_ticks(ax2.xaxis)
    ax2.set_xlabel("training wall-clock (s, log scale)")
    ax2.set_ylabel(f"{split} accuracy (%)")
    ax2.grid(alpha=0.3, which="both")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _time_bars(ax, rows: list[dict[str, Any]], names: list[str], colors: list[str]) -> None:
    """Bars of mean time to target (error bar = std over seeds); a row without one says why."""
    ys = list(range(len(rows)))[::-1]
    means = [r["time_to_target_s_mean"] or 0.0 for r in rows]
    stds = [r["time_to_target_s_std"] or 0.0 for r in rows]
    ax.barh(ys, means, xerr=stds, color=colors, capsize=3)
    for y, r in zip(ys, rows):
        if r["time_to_target_s_mean"] is None:
            ax.text(0, y, "  " + r["status"], va="center", fontsize=8, color="0.3")
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlim(left=0)  # seconds: with no bar matplotlib centred the axis on 0 and showed negative times


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2, 5 x 10^k, labelled as plain numbers ("0.5", "2", "20"), not "2x10^0"."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot(path: Path, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """:func:`stack_figure` written to ``path`` (a PNG)."""
    stack_figure(manifest, rows).savefig(path, dpi=110)


# He et al. 2015, Table 6: CIFAR-10 test error (%) of ResNet-CIFAR with option A (110: best of 5 runs).
PAPER_ERR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}
DEPTH_COLUMNS = ["depth", "params", "device", "seeds", "test_err_mean", "test_err_std", "paper_err",
                 "diff_vs_paper", "git_sha", "torch_version"]


def depth_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per depth whose every seed finished: final test error (%), against the paper's."""
    out = []
    for r in rows:
        if r["status"].startswith(("needs", "not run")) or r["seeds"] < r["seeds_planned"]:
            continue
        mean, std = _mean_std(r["test_errs"])
        paper = PAPER_ERR.get(r["depth"])
        out.append(dict(depth=r["depth"], params=r["params"], device=r["device"], seeds=r["seeds"],
                        test_err_mean=mean, test_err_std=std, paper_err=paper,
                        diff_vs_paper=None if paper is None else mean - paper, git_sha=r["git_sha"],
                        torch_version=r["torch_version"]))
    return out


def depth_report(manifest: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """resnet-depths.csv and .md: the paper's Table 6 next to ours."""
    table = depth_rows(rows)
    csv_path, md_path = out / "resnet-depths.csv", out / "resnet-depths.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DEPTH_COLUMNS)
        w.writeheader()
        for r in table:
            w.writerow({k: "" if r[k] is None else r[k] for k in DEPTH_COLUMNS})
    lines = [f"# {manifest['name']}", "",
             "Final CIFAR-10 test error (%) of the paper's recipe (option A, post-activation, batch 128, lr 0.1, "
             "/10 at 50% and 75% of 164 epochs on the 50k training set, pad-4 crop + flip), mean ± std over "
             "seeds, next to He et al. 2015, Table 6. Built by `python -m fastres.tools.report` from run summaries.",
             "", "| depth | params | seeds | test error (%) | paper (%) | ours - paper | device |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        err = f"{r['test_err_mean']:.2f}" + (f" ± {r['test_err_std']:.2f}" if r["test_err_std"] is not None else "")
        lines.append(f"| {r['depth']} | {r['params']:,} | {r['seeds']} | {err} | {_fmt(r['paper_err'], '.2f')} | "
                     f"{_fmt(r['diff_vs_paper'], '+.2f')} | {r['device']} |")
    pending = [f"{r['combination']} ({r['status']})" for r in rows
               if r["depth"] not in {t["depth"] for t in table}]
    if pending:
        lines += ["", "Not measured yet: " + ", ".join(pending) + "."]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def build_report(runs_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """The manifest's report in ``out_dir`` (stack.md/.csv/.png, or resnet-depths.csv/.md)."""
    manifest, rows = collect(runs_dir)
    out = Path(out_dir)
    with writing(out):  # a full disk or a read-only folder: one line
        out.mkdir(parents=True, exist_ok=True)
        if manifest.get("report") == "depths":
            return depth_report(manifest, rows, out)
        paths = [out / "stack.md", out / "stack.csv", out / "stack.png"]
        paths[0].write_text(markdown(manifest, rows))
        write_csv(paths[1], rows)
        plot(paths[2], manifest, rows)
        if gain := packing(manifest, rows):
            paths.append(out / "packing.json")
            paths[-1].write_text(json.dumps(gain, indent=1) + "\n")
    return paths


TUNING_ONLY = ("data.val_size", "eval.on_test", "run.eval_every")


def _flag_value(v: Any) -> str:
    """A value as an override flag takes it, with no spaces (the flags are joined by spaces)."""
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def pick(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(row name, override flags) of the row the --pick rule chooses (module docstring)."""
    if split_of(rows) != "val":
        raise UserError("--pick chooses on the validation split only: this stack's runs measured the test set")
    timed = [r for r in rows if r["time_to_target_s_mean"] is not None]
    run = [r for r in rows if r["seeds"] == r["seeds_planned"] and r["final_acc_mean"] is not None]
    if timed:
        best = min(timed, key=lambda r: r["time_to_target_s_mean"])
    elif run:
        best = max(run, key=lambda r: r["final_acc_mean"])
    else:
        raise UserError("--pick: no row has all its seeds finished")
    values = next(m["values"] for m in manifest["rows"] if m["name"] == best["combination"])
    flags = [f"--{k}={_flag_value(v)}" for k, v in sorted(values.items()) if k not in TUNING_ONLY]
    return best["combination"], flags


def last_stack() -> str:
    """The runs folder of the last ``fastres.tools.stack`` whose runs went under runs/ (it writes LAST_STACK there),
    else runs/stack."""
    try:
        return Path(LAST_STACK).read_text().strip() or "runs/stack"
    except OSError:
        return "runs/stack"


def command_line() -> Parser:
    p = parser("python -m fastres.tools.report", __doc__)
    p.add_argument("--runs", default=None, metavar="DIR",
                   help=f"a stack's runs folder (its stack.json) (default: the last stack's, as {LAST_STACK} names it, "
                        "else runs/stack)")
    p.add_argument("--out", default="results", metavar="DIR", help="where the report goes")
    p.add_argument("--pick", action="store_true", help="print the --pick rule's row as override flags instead")
    return p


def cli(argv: list[str] | None = None) -> int:
    return entry(_main, argv, command_line().format_help())


def _main(argv: list[str]) -> int | None:
    args = command_line().parse_args(argv)
    runs, out = args.runs or last_stack(), args.out
    if args.pick:
        name, flags = pick(*collect(runs))
        print(f"report: picked {name!r} on the validation split", file=sys.stderr)
        print(" ".join(flags))
        return None
    paths = build_report(runs, out)
    print("report: " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    sys.exit(cli())
