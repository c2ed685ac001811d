"""What produced a number: code version, torch version, device name. Every results row carries these."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """HEAD of the fastres checkout, with '-dirty' if the code or configs differ from it (results and docs
    do not count). What ``launch/device.sh prepare`` recorded in .device/git_sha, where .device/code_hash
    says it was recorded for the code now here (a GPU machine's copy of the working tree); else, where there
    is no .git, that record or 'unknown'. Only the checkout's own .git
    counts: a copy that happens to lie inside another repository must not report that one's HEAD."""
    recorded = _REPO / ".device" / "git_sha"
    recorded_code = _REPO / ".device" / "code_hash"
    if recorded.is_file() and recorded_code.is_file() and recorded_code.read_text().strip() == code_hash():
        # a GPU machine's copy may carry a stale .git of its own: what prepare recorded for exactly this code wins
        return recorded.read_text().strip()
    if not (_REPO / ".git").exists():
        return recorded.read_text().strip() if recorded.is_file() else "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no", "--",
                                "fastres", "configs"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def short_sha(sha: str) -> str:
    """A git SHA as tables show it: 12 hex digits, keeping a '-dirty' mark."""
    return sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")


def code_hash() -> str:
    """SHA-256 (first 16 hex digits) of every fastres source file: the code that trains, whatever the
    commit. A commit that only adds results keeps it, so finished runs stay reusable."""
    h = hashlib.sha256()
    pkg = _REPO / "fastres"
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores)"
