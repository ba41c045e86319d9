"""Build the live-migration test guest at test time and cache it.

The kernel comes from Debian's `linux-image-cloud-amd64` (fetched with `apt-get download`,
unpacked with `dpkg -x`); the initramfs holds static busybox, `init.sh` and `guestd` (compiled
here with `gcc -static`). Written as a newc cpio by this script, so no root is needed for device
nodes. The cache key is the kernel package version plus a hash of the guest sources, so a change
to either rebuilds and nothing stale is booted.

Shared by tests and benchmarks (tools/ is on sys.path): `build_guest()` returns the two files,
`guest_command()` the QEMU command line that boots them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dwcp-agent" / "guest"


class GuestBuildError(RuntimeError):
    """The guest could not be built; the message says which step failed and why."""


@dataclass(frozen=True)
class Guest:
    """A bootable guest: kernel image and initramfs."""

    kernel: Path
    initrd: Path


def unsupported_reason() -> str | None:
    """Why the guest cannot be built or booted here, or None (tests skip with this text)."""
    for tool in (QEMU, "apt-get", "apt-cache", "dpkg", "gcc"):
        if shutil.which(tool) is None:
            return f"live-migration guest needs '{tool}' on PATH"
    if not BUSYBOX.exists():
        return "live-migration guest needs static busybox at /bin/busybox (apt busybox-static)"
    return None


def _run(argv: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def _kernel_package() -> tuple[str, str]:
    """The concrete kernel package behind the meta-package, and its candidate version."""
    depends = _run(["apt-cache", "depends", KERNEL_META])
    names = [line.split()[-1] for line in depends.splitlines() if "Depends: linux-image-" in line]
    if not names:
        raise GuestBuildError(f"apt-cache knows no kernel behind {KERNEL_META} (apt-get update?)")
    policy = _run(["apt-cache", "policy", names[0]])
    versions = [line.split()[-1] for line in policy.splitlines() if "Candidate:" in line]
    return names[0], versions[0] if versions else "unknown"


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in ("guestd.c", "init.sh", "build.py"):
        digest.update((HERE / name).read_bytes())
    digest.update(BUSYBOX.read_bytes())
    return digest.hexdigest()[:12]


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc cpio record (header, name, data, each padded to 4 bytes)."""
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
    record = header + name.encode() + b"\0"
    record += b"\0" * (-len(record) % 4)
    record += data + b"\0" * (-len(data) % 4)
    return record


def _write_initramfs(path: Path, guestd: Path) -> None:
    entries = [
        _cpio_entry("dev", 0o040755),
        _cpio_entry("dev/console", 0o020600, rdev=(5, 1)),
        _cpio_entry("proc", 0o040755),
        _cpio_entry("sys", 0o040755),
        _cpio_entry("bin", 0o040755),
        _cpio_entry("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        _cpio_entry("init", 0o100755, (HERE / "init.sh").read_bytes()),
        _cpio_entry("guestd", 0o100755, guestd.read_bytes()),
        _cpio_entry("TRAILER!!!", 0),
    ]
    with gzip.open(path, "wb", compresslevel=6) as out:
        for entry in entries:
            out.write(entry)


def build_guest(cache: Path = DEFAULT_CACHE) -> Guest:
    """The cached guest for the current kernel package and sources, built first if missing."""
    reason = unsupported_reason()
    if reason is not None:
        raise GuestBuildError(reason)
    package, version = _kernel_package()
    target = cache / f"{version}-{_sources_digest()}"
    guest = Guest(target / "vmlinuz", target / "initrd.gz")
    if guest.kernel.exists() and guest.initrd.exists():
        return guest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guest-build-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        _run(["apt-get", "download", f"{package}={version}"], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download {package} produced no .deb")
        _run(["dpkg", "-x", str(debs[0]), str(tmp / "root")])
        kernels = sorted((tmp / "root" / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise GuestBuildError(f"{debs[0].name} holds no /boot/vmlinuz-*")
        _run(["gcc", "-O2", "-static", "-o", str(tmp / "guestd"), str(HERE / "guestd.c")])
        staged = tmp / "out"
        staged.mkdir()
        shutil.copyfile(kernels[0], staged / "vmlinuz")
        _write_initramfs(staged / "initrd.gz", tmp / "guestd")
        try:
            staged.rename(target)
        except OSError:
            if not (guest.kernel.exists() and guest.initrd.exists()):
                raise
    return guest


def kvm_usable() -> bool:
    """Whether /dev/kvm can be opened here (the boot itself is tried by the caller's timeout)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def ram_size(mem_mib: int, accel: str) -> str:
    """QEMU's -m for the guest. Under TCG, 8 KiB more than `mem_mib` MiB.

    QEMU before 9.0 loses guest stores during TCG pre-copy when a RAM block's length is a
    multiple of 64 pages: the dirty-bitmap sync takes a word-at-a-time fast path that clears
    bits without resetting the TCG TLB, so later stores through cached TLB entries are not
    tracked and the destination guest gets stale pages (here: kernel panics on the destination
    after migrating a dirtying guest, 1 in 3 at the default downtime, every time at 1 ms). An odd
    length takes the slow path, which resets the TLB. Fixed upstream by "physmem: Fix migration
    dirty bitmap coherency with TCG memory access"; KVM is not affected.
    """
    return f"{mem_mib * 1024 + 8}K" if accel == "tcg" else str(mem_mib)


def machine_args(guest: Guest, mem_mib: int = 256, dirty_mbps: int = 0, dirty_mb: int = 0,
                 accel: str = "tcg") -> list[str]:
    """The machine half of the QEMU command: identical on source and destination.

    `no_timer_check`: under TCG on a loaded host the kernel's early check that the timer
    interrupt arrives through the IO-APIC can time out ("IO-APIC + timer doesn't work!"), and the
    guest panics at boot (seen at load 15-26 on 2 cores); the check says nothing about a VM.
    """
    cmdline = "console=ttyS0 quiet panic=-1 mitigations=off no_timer_check"
    if dirty_mbps > 0:
        cmdline += f" dwcp.dirty={dirty_mbps},{dirty_mb}"
    return [
        QEMU, "-nodefaults", "-no-user-config", "-nographic", "-machine", "q35",
        "-accel", accel, "-cpu", "max" if accel == "tcg" else "host", "-smp", "1", "-m", ram_size(mem_mib, accel),
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", cmdline,
        "-no-reboot",
    ]


def guest_command(guest: Guest, qmp_socket: Path, serial_log: Path, mem_mib: int = 256,
                  dirty_mbps: int = 0, dirty_mb: int = 0, accel: str = "tcg",
                  incoming: bool = False) -> list[str]:
    """The full QEMU command: machine args, QMP on a unix socket, serial appended to a file."""
    argv = machine_args(guest, mem_mib, dirty_mbps, dirty_mb, accel)
    argv += [
        "-chardev", f"file,id=serial0,path={serial_log}", "-serial", "chardev:serial0",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv
