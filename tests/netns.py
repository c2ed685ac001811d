"""Hosts made on this machine for multi-node tests: one Linux network namespace per node, joined by a bridge.

Each node is a namespace with its own loopback and one interface, eth0, at 10.213.0.<i + 1>/24; the eth0s are
veth pairs whose other ends are ports of a bridge inside a hub namespace of their own. The subnet exists only
inside these namespaces (the root namespace gets no interface, route or address), so the tests' traffic goes
between their own nodes and nowhere else. Names carry the pid and a counter: concurrent test runs do not meet.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.213.0"  # private test addresses: node i is SUBNET.(i + 1), visible only inside the namespaces
IFNAME = "eth0"  # each node's one interface (GLOO_SOCKET_IFNAME, so gloo binds to it, not to the hostname's address)
_count = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can): not root, no `ip`, or refused."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2's `ip` and util-linux's `unshare`"
    probe = f"frprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"`ip netns add` is refused here ({getattr(e, 'stderr', '') or e})".strip()
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


class Hosts:
    """``n`` nodes; ``with Hosts(3) as hosts:`` makes them, and on exit kills what runs in them and deletes them."""

    def __init__(self, n: int):
        tag = f"fr{os.getpid()}x{next(_count)}"
        self.n, self.hub, self.names = n, f"{tag}hub", [f"{tag}n{i}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def _make(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            # both ends made inside namespaces: nothing is ever named in the root namespace
            _ip("-n", self.hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", IFNAME, "netns", ns)
            _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def command(self, i: int, cmd: list[str], mount: tuple[Path, Path] | None = None) -> list[str]:
        """``cmd`` run on node ``i``; with ``mount = (src, dst)``, in a mount namespace of its own where ``dst`` is
        ``src`` (a bind mount the rest of the machine does not see: the same path, another directory)."""
        if mount is None:
            return ["ip", "netns", "exec", self.names[i], *cmd]
        src, dst = mount
        return ["ip", "netns", "exec", self.names[i], "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(src), str(dst), *cmd]

    def start(self, i: int, cmd: list[str], log: Path, env: dict[str, str], mount=None, cwd=None) -> subprocess.Popen:
        """``cmd`` on node ``i``, its stdout and stderr appended to ``log``."""
        with open(log, "a") as f:
            proc = subprocess.Popen(self.command(i, cmd, mount), stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)  # a Ctrl-C of pytest is not theirs
        self.procs.append(proc)
        return proc

    def pids(self, i: int) -> list[int]:
        """Every process running on node ``i`` (in its network namespace): agents, workers, orphans."""
        r = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True, timeout=30)
        return [int(p) for p in r.stdout.split()]

    def close(self) -> None:
        for i in range(self.n):  # what runs in these namespaces only, by pid: torchrun's workers have sessions
            for pid in self.pids(i):  # of their own, and outlive a killed agent
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for ns in [*self.names, self.hub]:  # deleting a namespace removes its interfaces, veth peers included
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(check, what: str, procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> None:
    """Poll ``check()`` until true; fail naming ``what`` (with the logs' tails) past ``timeout`` seconds, or when a
    process in ``procs`` has ended."""
    t0 = time.monotonic()
    while not check():
        ended = [p.args[-1] for p in procs if p.poll() is not None]
        if ended or time.monotonic() - t0 > timeout:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
            raise AssertionError(f"{what}: {'a process ended' if ended else f'not within {timeout} s'}\n{tails}")
        time.sleep(0.1)
