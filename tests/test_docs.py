"""What the README and docs/ say, checked against what produced it: docs/results.md's tables are the generated
ones (``python3 tests/test_docs.py`` prints them, ``--write`` puts them into docs/results.md), the README's cost of
the baseline is derived from its measured rate, the docs name every results file and use the current commands,
and none of it speaks of how its authors get a GPU."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCH_IMAGES = 50_000  # CIFAR-10's training set: what one epoch of the baseline trains on

# ---------------------------------------------------------------------------------------- the generators


def stack_table() -> str:
    """The table of results/stack.md (written by python -m fastres.tools.report), as the README shows it."""
    lines = (ROOT / "results" / "stack.md").read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("|")) + "\n"


def ladder_rows() -> list[dict]:
    """results/bench.json's fast-path rows (launch/fastpath.sh: "step N: ..."), in step order."""
    rows = [r for r in json.loads((ROOT / "results" / "bench.json").read_text())
            if re.match(r"step \d+: ", r["config_name"])]
    return sorted(rows, key=lambda r: int(r["config_name"].split()[1].rstrip(":")))


def noise() -> float:
    """Two standard deviations of the ratio of two single runs, relative: from the spread of the baseline that
    every row measured again in its own process (the same config, minutes apart), sqrt(2) for a ratio of two."""
    base = [r["baseline_img_per_s"] for r in ladder_rows()]
    return 2 * math.sqrt(2) * statistics.stdev(base) / statistics.fmean(base)


def ladder_table() -> str:
    rows, band = ladder_rows(), noise()
    out = ["| step | img/s | baseline img/s, same process | vs that baseline | vs the step before |",
           "|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        label = r["config_name"].split(": ", 1)[1]
        if i == 0:
            before = "- (the baseline against itself: run-to-run noise)"
        else:
            change = r["img_per_s"] / rows[i - 1]["img_per_s"]
            within = abs(change - 1) < band
            before = f"{change:.2f}x" + (", slower" if change < 1 else "") + (", within noise" if within else "")
        out.append(f"| {i} {label} | {r['img_per_s']:,.0f} | {r['baseline_img_per_s']:,.0f} | "
                   f"{r['speedup_vs_baseline']:.2f}x | {before} |")
    return "\n".join(out) + "\n"


def noise_line() -> str:
    base = [r["baseline_img_per_s"] for r in ladder_rows()]
    cv = statistics.stdev(base) / statistics.fmean(base)
    return (f"the baseline measured in each row's process ranged {min(base):,.0f}-{max(base):,.0f} img/s over the "
            f"{len(base)} rows (a relative standard deviation of {cv:.0%}), so a change of less than {noise():.0%} "
            f"between two single runs is marked within noise")


def baseline_cost() -> str:
    """What the README's first command costs on one GPU, derived from the measured baseline rate."""
    r = ladder_rows()[0]
    minutes = r["config"]["run"]["epochs"] * EPOCH_IMAGES / r["img_per_s"] / 60
    return (f"{r['config']['run']['epochs']} epochs x {EPOCH_IMAGES:,} images / {r['img_per_s']:,.0f} img/s "
            f"= about {minutes:.0f} minutes on one {r['device'].replace('NVIDIA ', '')}")


# What goes between "<!-- NAME: ... -->" and "<!-- end NAME -->" in docs/results.md: tables on lines of their own
# (a blank line before the end mark, so the table ends there), sentences inline. The README keeps no such marks.
GENERATED = {"stack table": lambda: f"\n{stack_table()}\n", "ladder table": lambda: f"\n{ladder_table()}\n",
             "ladder noise": noise_line}
TABLES = ROOT / "docs" / "results.md"


def block(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}: .*? -->(.*?)<!-- end {name} -->", text, re.S)
    assert m, f"docs/results.md has no generated block '{name}'"
    return m.group(1)


def write_tables() -> None:
    text = TABLES.read_text()
    for name, make in GENERATED.items():
        text = text.replace(block(text, name), make(), 1)
    TABLES.write_text(text)


# ------------------------------------------------------------------------------------------------ the tests

def test_the_results_tables_are_the_generated_ones():
    text = TABLES.read_text()
    for name, make in GENERATED.items():
        assert block(text, name) == make(), f"block '{name}' is stale: run python3 tests/test_docs.py --write"
    assert text.index("<!-- stack table") < text.index("<!-- ladder table"), \
        "the first table is time to target per stacked combination"


def test_the_stack_table_has_every_row_of_the_ladder_and_says_what_is_not_measured():
    sys.path.insert(0, str(ROOT))
    from fastres.tools.stack import load_stack

    stack = load_stack(ROOT / "configs" / "stack.toml")
    table = stack_table().splitlines()[2:]
    names = [line.split(" | ")[0].removeprefix("| ").removesuffix(" *(alone)*") for line in table]
    assert names == [row.name for row in stack.rows]  # regenerate results/stack.md after changing the ladder
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"[\d.]+( ± [\d.]+)?", cells[3]) or cells[3] in (
            "not run", "never reached") or re.search(r"seeds (run|reached)|needs \d GPU", cells[3]), cells


def test_the_baseline_row_is_explained_and_rows_slower_than_the_one_before_say_so():
    table = ladder_table().splitlines()[2:]
    assert "the baseline against itself" in table[0]
    rows = ladder_rows()
    for i in range(1, len(rows)):
        if rows[i]["img_per_s"] < rows[i - 1]["img_per_s"]:
            assert "slower" in table[i], table[i]


def test_readme_states_what_the_commands_cost_and_on_what():
    text = (ROOT / "README.md").read_text()
    first, prose = text.split("```bash\n", 1)[1].split("```\n", 1)
    head = " ".join(prose[:prose.index("## Quickstart")].split())
    assert "configs/smoke.toml" in first.splitlines()[0]  # what a first-time user should run comes first
    assert "<!--" not in text, "generator marks belong in docs/results.md"
    assert re.search(r"It took \d+ s on 2 idle CPU cores and \d+ s beside a program keeping one of them busy", head)
    assert re.search(r"test suite .*about \d+ minutes on 2 CPU cores, set-up included, measured on an idle", head)
    assert "python3 -m pytest -q -m quick" in head and re.search(r"quick subset .* in \d+ s on 2 idle CPU cores", head)
    assert baseline_cost() in head  # the GPU cost, derived from results/bench.json's baseline rate
    assert re.search(r"the program's own estimate at its start was about \d+ h on idle cores and \d+ h", head)
    assert "leave `slurm` out to skip it" in head  # the test command's apt install, said before it happens


def test_the_readme_maps_the_product():
    text = " ".join((ROOT / "README.md").read_text().split())
    for words in ("CIFAR-100", "image folders", "torchvision's ResNet-18 to 152", "top-5", "several nodes",
                  "(docs/data.md)", "(docs/multinode.md)", "launch/multinode.sh"):
        assert words in text, words


def user_facing() -> list[Path]:
    """What a user reads: README, docs (docs/layout.md is the code's map, kept by its code), configs, launch
    scripts, the results folders' READMEs."""
    return ([ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "layout.md"]
            + sorted((ROOT / "configs").glob("*.toml")) + sorted((ROOT / "launch").glob("*.sh"))
            + sorted((ROOT / "results").glob("*/README.md")))


def product_files() -> list[Path]:
    """Everything the project ships but its records: code, tests, docs, configs, scripts, CI."""
    found = [ROOT / name for name in ("README.md", "pyproject.toml", ".gitignore", ".ci/run")]
    for folder, pattern in (("fastres", "*.py"), ("tests", "*.py"), ("dev", "*.py"), ("docs", "*.md"),
                            ("configs", "*.toml"), ("launch", "*")):
        found += sorted(p for p in (ROOT / folder).rglob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    return found + sorted((ROOT / "results").glob("*/README.md"))


ABSOLUTE = re.compile(r"(?<![\w.~:/${}-])/[A-Za-z_][\w.-]*(?:/[\w.*-]+)*")  # /a/b, not a URL or a relative path
SYSTEM = ("/dev", "/proc", "/sys", "/usr", "/bin", "/etc", "/run", "/tmp", "/var", "/opt", "/lib")


def machine_paths(text: str, here: tuple[str, ...]) -> list[str]:
    """The absolute paths in ``text`` that belong to this machine rather than to any: under one of ``here`` (the
    checkout's parent, the home folder), or existing here outside the system folders every Linux has."""
    hits = []
    for path in ABSOLUTE.findall(text):
        system = any(path == s or path.startswith(s + "/") for s in SYSTEM)
        if any(path == h or path.startswith(h + "/") for h in here) or (not system and Path(path).exists()):
            hits.append(path)
    return hits


def test_machine_paths_are_found_and_generic_ones_pass():
    here = ("/home/someone", "/srv/checkouts")
    text = "see /srv/checkouts/shared/data and ~/x, https://a.b/c, /dev/null, /data/imagenet, runs/a/b"
    assert machine_paths(text, here) == ["/srv/checkouts/shared/data"]
    assert machine_paths("a copy in /home/someone/cifar, not in /home/other", here) == ["/home/someone/cifar"]


def test_the_product_names_no_absolute_path_of_the_machine_it_was_written_on():
    """No path of the author's disk in the code, docs, configs, scripts or CI: where data lives is a flag or
    $FASTRES_DATA, relative to the checkout at most."""
    parent = str(ROOT.resolve().parent)
    here = tuple(h for h in (parent, str(Path.home())) if h not in ("/", *SYSTEM))
    hits = [f"{p.relative_to(ROOT)}:{n}: {hit}" for p in product_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            for hit in machine_paths(line, here)]
    assert not hits, "\n".join(hits)


def test_commands_name_the_tools_where_they_live():
    old = re.compile(r"fastres\.(bench|stack|report|profile|dispatch|scaling)\b")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in user_facing()
            for n, line in enumerate(p.read_text().splitlines(), 1) if old.search(line)]
    assert not hits, "use fastres.tools.<tool>: " + ", ".join(hits)


def test_no_seed_for_a_recipe():
    """'the seed' is run.seed; the recipes are named for their sources (He et al. 2015, the 2017 study). Table rows
    are left out: they are generated from the configs' row names and notes."""
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in user_facing() if p.suffix != ".toml"
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\bthe seed(?!s)\b", line, re.I) and not line.startswith("|")]
    assert not hits, "\n".join(hits)


def test_docs_results_lists_every_results_file():
    listed = (ROOT / "docs" / "results.md").read_text()
    for entry in sorted((ROOT / "results").iterdir()):
        name = entry.name + ("/" if entry.is_dir() else "")
        assert f"`{name}`" in listed, f"docs/results.md does not list results/{name}"


def test_local_links_in_readme_and_docs_exist():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_tables()
    else:
        for name, make in GENERATED.items():
            print(f"--- {name}:{make()}")
