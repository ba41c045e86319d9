"""Whether a source and a destination QEMU can migrate to each other: a pure comparison.

QEMU itself refuses a mismatched stream only after the transfer started (or loads it wrongly
across versions); checking first lets the agent refuse with a message naming the problem and
change nothing.
"""

from __future__ import annotations

from dwcp_agent.live.qmp import VmFacts

__all__ = ["incompatibilities"]


def incompatibilities(source: VmFacts, destination: VmFacts) -> list[str]:
    """Human-readable problems; empty when the two can migrate."""
    problems = []
    if source.machine != destination.machine:
        problems.append(f"machine type differs: source {source.machine}, destination {destination.machine}")
    if source.ram_bytes != destination.ram_bytes:
        problems.append(f"RAM size differs: source {source.ram_bytes >> 20} MiB, "
                        f"destination {destination.ram_bytes >> 20} MiB")
    if _major_minor(destination.version) < _major_minor(source.version):
        problems.append(f"destination QEMU {destination.version} is older than source {source.version}")
    return problems


def _major_minor(version: str) -> tuple[int, int]:
    parts = [*version.split("."), "0", "0"][:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return (0, 0)
