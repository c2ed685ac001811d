"""The README's promises about itself: two commands first, the test one is what CI runs."""

from __future__ import annotations

import re

from conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block and text.index(first_block.group(0)) < 20, "the README must open with its commands"
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_commands():
    main, tests = readme_commands()
    assert "launch/install.sh" in main and "fastres.train" in main
    assert "launch/install.sh test" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_and_the_lint():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
    assert ci.index("python3 -m ruff check .") > ci.index(readme_commands()[1])  # ruff is in the test extra


def test_install_pins_the_standard_pair_before_the_project():
    lines = (ROOT / "launch" / "install.sh").read_text().splitlines()
    torch_line = next(i for i, line in enumerate(lines) if '"torch==2.14.*" "torchvision==0.29.*"' in line)
    project_line = next(i for i, line in enumerate(lines) if "install -q -e" in line)
    assert torch_line < project_line
