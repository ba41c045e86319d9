"""Network namespace plumbing shared by the WAN bed (tools/wanbed.py) and the nemesis net
(tests/nemesis/nemesis_net.py): create/delete namespaces, run commands inside them, move a
thread into one, and the two faults this kernel can do without netem on a namespace's ingress:
random DROP (`iptables -m statistic`) and delay (tools/nfq-delay on an NFQUEUE rule).

Put tools/ on sys.path to import it (tools/ is not a package).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

TOOLS = Path(__file__).resolve().parent
NFQ_DIR = TOOLS / "nfq-delay"
NFQ_DELAY = NFQ_DIR / "nfq-delay"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr."""


def run(argv: Sequence[str], timeout: float = 60) -> None:
    """Run a host command (ip, tc, ...) and raise NetnsError when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def cmd(ns: str, argv: Sequence[str]) -> list[str]:
    """`argv` wrapped to run inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def add(ns: str) -> None:
    run(["ip", "netns", "add", ns])


def delete(ns: str) -> None:
    """Delete a namespace (its veths and rules go with it); quiet when it is already gone."""
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def drop_randomly(ns: str, match: Sequence[str], probability: float) -> None:
    """Drop this fraction of the packets entering `ns` that `match` (iptables INPUT arguments)."""
    run(cmd(ns, ["iptables", "-w", "-A", "INPUT", *match, "-m", "statistic", "--mode", "random",
                 "--probability", f"{probability:.6f}", "-j", "DROP"]))


def start_delayer(ns: str, match: Sequence[str], queue: int, delay_s: float) -> subprocess.Popen[bytes]:
    """Delay the packets entering `ns` that `match` by `delay_s` (nfq-delay on NFQUEUE `queue`).

    Returns the delayer process; stop it with `stop` (the rule is removed by `flush_input`).
    """
    proc = subprocess.Popen(cmd(ns, [str(NFQ_DELAY), str(queue), str(int(delay_s * 1e6))]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        stop(proc)
        raise NetnsError(f"nfq-delay did not start in {ns}: {line!r}")
    try:
        run(cmd(ns, ["iptables", "-w", "-A", "INPUT", *match, "-j", "NFQUEUE", "--queue-num", str(queue),
                     "--queue-bypass"]))
    except NetnsError:
        stop(proc)
        raise
    return proc


def flush_input(ns: str) -> None:
    """Remove every INPUT rule of `ns` (drops and delays)."""
    subprocess.run(cmd(ns, ["iptables", "-w", "-F", "INPUT"]), capture_output=True, timeout=60)


def stop(proc: subprocess.Popen[Any]) -> None:
    """Terminate (then kill) a process started here and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr, proc.stdin):
        if pipe is not None:
            pipe.close()


class NetnsScope:
    """Move the calling thread into a named network namespace and back (sockets keep their ns)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._home: int | None = None

    def __enter__(self) -> NetnsScope:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._home is not None
        try:
            _setns(self._home)
        finally:
            os.close(self._home)


def _setns(fd: int) -> None:
    """setns(2) for the calling thread (os.setns arrives only in Python 3.12)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
