"""``pytest -m quick``: the subset a newcomer runs first (tests/conftest.py QUICK) covers every area and selects."""

from __future__ import annotations

import ast

from conftest import COLLECTED, MARKED, QUICK, ROOT

AREAS = ("config", "model", "training step", "resume", "errors")


def test_quick_set_covers_every_area():
    assert set(AREAS) <= set(QUICK) and all(QUICK[area] for area in AREAS)
    for area, entries in QUICK.items():
        for entry in entries:  # each names a test that exists (a rename would drop it from the set unseen)
            file, name = entry.split("::")
            tree = ast.parse((ROOT / "tests" / file).read_text())
            assert name.split("[")[0] in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, entry
            if file in COLLECTED:  # collected in this session (always under -m quick): pytest marked it
                assert MARKED.get(entry), f"{entry} ({area}) matches none of {file}'s tests"
