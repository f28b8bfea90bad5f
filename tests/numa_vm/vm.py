"""Boot a two-node NUMA guest under QEMU (TCG) and run the real staging agents in it.

    python tests/numa_vm/vm.py [--keep] [--timeout S]

prints the guest's findings as one JSON object (see guest.py) and exits 0 when the guest ran
to the end (the checks themselves are tests/numa_vm/test_numa_vm.py's). What it needs:

- Debian packages qemu-system-x86 (qemu-system-x86_64) and busybox-static (a static
  /bin/busybox); apt-get, apt-cache and dpkg for the kernel. (The initramfs is written by
  `cpio_newc` here, so the cpio package is not needed.)
- One network fetch, once: `apt-get download linux-image-<version>-amd64` from the Debian
  mirror apt is configured with, the version being the one `linux-image-amd64` depends on.
  Its vmlinuz and the few modules the guest loads are kept under tests/numa_vm/.cache/, with the
  initramfs built from them, so later runs fetch nothing.

The guest: 2 vCPUs and 2 x 1 GiB of RAM as NUMA nodes 0 and 1 (distance 21). Its busybox init
loads virtio, 9p and virtio_net, mounts the host's / read-only over 9p, mounts proc, sysfs,
devtmpfs and tmpfs over it, chroots, and runs this checkout's venv Python on a script (guest.py
by default); a second, writable 9p share (the job folder, /run/job) carries the job in and
result.json out. What else a run may ask for (qemu_command):

- more writable 9p shares (`Share`: a host folder, mounted in the guest at /run/<...> or over
  the read-only view of a host path), uncached so that the host's writes are seen at once; the
  guest learns them from the kernel command line (NVM_SHARES=tag=/path,...);
- a network (`net=True`): a virtio NIC on QEMU's user-mode network, with no port forwarded into
  the guest. init brings up lo and eth0 as 10.0.2.15/24 with 10.0.2.2 as the default route; a
  connection from the guest to 10.0.2.2:PORT reaches the host's 127.0.0.1:PORT (QEMU opens it
  as a socket of its own on the host, as it does for any address the guest connects to). The
  tests connect to 10.0.2.2 only, and what they start on the host listens on 127.0.0.1 only.

`run_guest` runs a guest to its end; `GuestRun` starts one in the background (its console in
JOB/console.txt) so that the host can act while it runs (tests/numa_vm/remote.py, which runs
the real coordinator on the host and its agents in the guest, is built on it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = HERE / ".cache"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")

# Load order of the modules the guest needs (the kernel has NUMA, NUMA emulation, tmpfs and
# IPv4 built in; virtio_net needs net_failover, which needs failover). A name absent from
# another kernel release (fscache merged into netfs) is skipped.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
)

# The guest's /init. Parameters come from the kernel command line (NVM_*), which the kernel
# passes to init as environment variables.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod /modules/$m.ko || echo "NVM: insmod $m failed"
done
set -e
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
# Writable space goes on /run, not over /tmp: the checkout (and its venv) may live under the
# host's /tmp, which must stay visible.
mount -t tmpfs -o mode=755 run /newroot/run
mkdir -p /newroot/run/job /newroot/run/tmp
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /newroot/run/job
# More writable shares, NVM_SHARES=tag=/guest/path,...: no cache, so that what the host
# writes there is seen at once (the folder is made under /run, or is one the host has).
for share in $(echo "$NVM_SHARES" | tr , ' '); do
  mkdir -p "/newroot${share#*=}"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "${share%%=*}" "/newroot${share#*=}"
done
# The network, when QEMU gave the guest a NIC (user-mode networking: the guest is 10.0.2.15,
# and 10.0.2.2 is the host's loopback).
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
set +e
echo "NVM: init ready at $(cut -d' ' -f1 /proc/uptime) s"
cd /newroot
chroot /newroot /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
  HOME=/run TMPDIR=/run/tmp PYTHONDONTWRITEBYTECODE=1 "$NVM_PY" "$NVM_GUEST" /run/job
echo "NVM: guest exited with $? at $(cut -d' ' -f1 /proc/uptime) s"
sync
poweroff -f
"""


class VMError(RuntimeError):
    """The guest could not be built, booted or did not report."""


@dataclass(frozen=True)
class Kernel:
    """A kernel image and the guest's modules, in load order."""

    version: str
    vmlinuz: Path
    modules: tuple[Path, ...]


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One builder of the cache at a time (parallel test runs share it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; VMError with its output when it fails."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, **kw)
    except FileNotFoundError:
        raise VMError(f"{cmd[0]} not found") from None
    except subprocess.CalledProcessError as e:
        raise VMError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()}") from None


def kernel_package() -> str:
    """The package `linux-image-amd64` depends on, e.g. linux-image-6.1.0-56-amd64."""
    out = run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    m = re.search(r"Depends: (linux-image-[0-9][\w.+-]*-amd64)\b", out)
    if not m:
        raise VMError(f"apt-cache depends linux-image-amd64 names no kernel package:\n{out}")
    return m.group(1)


def cached_kernel() -> Kernel | None:
    """The kernel already under .cache/, if a complete one is there, kept for today's MODULES
    (a cache made for another list is fetched again)."""
    for d in sorted(CACHE.glob("kernel-*"), reverse=True):
        manifest = d / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            if m.get("wanted") != list(MODULES):
                continue
            return Kernel(m["version"], d / "vmlinuz", tuple(d / p for p in m["modules"]))
    return None


def fetch_kernel() -> Kernel:
    """apt-get download the Debian kernel, keep its vmlinuz and the guest's modules."""
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    work = Path(tempfile.mkdtemp(prefix="kernel-", dir=CACHE))
    try:
        run(["apt-get", "download", package], cwd=work)
        [deb] = work.glob("*.deb")
        run(["dpkg", "-x", str(deb), str(work / "x")])
        dest = CACHE / f"kernel-{version}"
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "modules").mkdir(parents=True)
        shutil.copy(work / "x" / "boot" / f"vmlinuz-{version}", dest / "vmlinuz")
        tree = work / "x" / "lib" / "modules" / version / "kernel"
        names = []
        for name in MODULES:
            found = [p for p in tree.rglob(f"{name}.ko*") if p.name.split(".ko")[0] == name]
            if not found:
                continue
            src = found[0]
            data = src.read_bytes()
            if src.name.endswith(".ko.xz"):
                data = lzma.decompress(data)
            elif not src.name.endswith(".ko"):
                raise VMError(f"{src.name}: compressed in a form busybox insmod cannot load")
            (dest / "modules" / f"{name}.ko").write_bytes(data)
            names.append(f"modules/{name}.ko")
        if not any(n.endswith("/9p.ko") for n in names):
            raise VMError(f"{package} has no 9p module")
        if not any(n.endswith("/virtio_net.ko") for n in names):
            raise VMError(f"{package} has no virtio_net module")
        manifest = {"version": version, "modules": names, "wanted": list(MODULES)}
        (dest / "manifest.json").write_text(json.dumps(manifest))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kernel = cached_kernel()
    assert kernel is not None
    return kernel


def cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive in the newc format the kernel unpacks, of (name, mode, data, rdev) entries
    (rdev: major << 8 | minor of a device node). Written here so no cpio binary is needed."""
    out = bytearray()
    trailer = ("TRAILER!!!", 0, b"", 0)
    for ino, (name, mode, data, rdev) in enumerate([*entries, trailer], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4)
        out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def is_static(elf: bytes) -> bool:
    """True if an ELF64 executable has no PT_INTERP (needs no dynamic loader)."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(elf[32:40], "little")
    size, count = int.from_bytes(elf[54:56], "little"), int.from_bytes(elf[56:58], "little")
    types = (
        int.from_bytes(elf[phoff + i * size : phoff + i * size + 4], "little") for i in range(count)
    )
    return 3 not in types  # PT_INTERP


def build_initramfs(kernel: Kernel) -> Path:
    """The busybox initramfs for `kernel`, built once per content under .cache/."""
    if not BUSYBOX.is_file():
        raise VMError(f"{BUSYBOX} is missing: install the Debian package busybox-static")
    busybox = BUSYBOX.read_bytes()
    if not is_static(busybox):
        raise VMError(f"{BUSYBOX} is not a static x86-64 binary: install busybox-static")
    modules = [(f"modules/{p.name}", p.read_bytes()) for p in kernel.modules]
    order = "\n".join(p.name.removesuffix(".ko") for p in kernel.modules) + "\n"
    digest = hashlib.sha256(INIT.encode() + busybox + order.encode())
    for _, data in modules:
        digest.update(data)
    path = CACHE / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.cpio.gz"
    if path.is_file():
        return path
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    c = stat.S_IFCHR | 0o600
    dirs = ("bin", "dev", "proc", "sys", "newroot", "modules")
    entries = [(name, d, b"", 0) for name in dirs]
    entries += [("dev/console", c, b"", 5 << 8 | 1), ("dev/null", c | 0o066, b"", 1 << 8 | 3)]
    entries += [("bin/busybox", x, busybox, 0), ("init", x, INIT.encode(), 0)]
    entries += [("modules.order", f, order.encode(), 0)]
    entries += [(n, f, b, 0) for n, b in modules]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=1))
    tmp.rename(path)
    return path


def prepare() -> tuple[Kernel, Path]:
    """The kernel and initramfs, from the cache or built into it."""
    with cache_lock():
        kernel = cached_kernel() or fetch_kernel()
        return kernel, build_initramfs(kernel)


def publish_batch(job: Path, batch_id: str, rows: int) -> list[str]:
    """A real batch (7 models' results, zstd Parquet, through the SDK) in the job's staging."""
    sys.path.insert(0, str(ROOT))
    from agents import slm
    from coordinator.ctl.demo import synthetic_batch

    _, tables = synthetic_batch(rows, seed=5)
    for model, table in tables.items():
        slm.publish(job / "staging", batch_id, model, table)
    return sorted(tables)


def footers(folder: Path) -> dict[str, Any]:
    """What the batch's files' footers say of their compression, read here on the host with
    pyarrow: column-chunk bytes stored and decompressed, and the SDK's recorded CPU seconds."""
    import pyarrow.parquet as pq

    stored = decoded = 0
    cpu = 0.0
    for path in sorted(folder.iterdir()):
        md = pq.read_metadata(path)
        for r in range(md.num_row_groups):
            for c in range(md.num_columns):
                stored += md.row_group(r).column(c).total_compressed_size
                decoded += md.row_group(r).column(c).total_uncompressed_size
        cpu += float(md.metadata[b"numa_coordinator.encode_cpu_s"])
    return {"compressed_bytes": stored, "decoded_bytes": decoded, "encode_cpu_s": cpu}


@dataclass(frozen=True)
class Share:
    """A writable host folder the guest mounts over 9p at `guest` (an absolute path: under /run,
    or one that exists on the host, whose read-only view it then covers)."""

    tag: str
    host: Path
    guest: str


def qemu_command(
    kernel: Kernel,
    initramfs: Path,
    job: Path,
    *,
    script: Path = HERE / "guest.py",
    shares: tuple[Share, ...] = (),
    net: bool = False,
) -> list[str]:
    """The QEMU command line of the two-node guest that runs `script` on `job`; with `net`, a
    virtio NIC on QEMU's user-mode network, which forwards nothing into the guest (no hostfwd):
    the guest connects out, and reaches the host's loopback as 10.0.2.2."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    for p in (python, script, job, *(s.host for s in shares), *(s.guest for s in shares)):
        if re.search(r"[\s,=]", str(p)):
            raise VMError(f"{p}: a path with a space, comma or '=' cannot be passed to the guest")
    for share in shares:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", share.tag) or share.tag in ("hostroot", "job"):
            raise VMError(f"share tag {share.tag!r}: lower-case letters, digits, '_', not taken")
        if not share.guest.startswith("/"):
            raise VMError(f"share {share.tag}: guest path {share.guest!r} is not absolute")
    append = f"console=ttyS0 quiet loglevel=3 panic=-1 NVM_PY={python} NVM_GUEST={script}"
    if shares:
        append += f" NVM_SHARES={','.join(f'{s.tag}={s.guest}' for s in shares)}"
    command = [
        QEMU,
        *("-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"),
        *("-object", "memory-backend-ram,id=m0,size=1024M"),
        *("-object", "memory-backend-ram,id=m1,size=1024M"),
        *("-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1"),
        *("-numa", "dist,src=0,dst=1,val=21"),
        *("-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs), "-append", append),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={job},mount_tag=job,security_model=none,multidevs=remap",
    ]
    for share in shares:
        command += ["-virtfs", f"local,path={share.host},mount_tag={share.tag},security_model=none"]
    if net:
        # romfile= : no PXE option ROM to load (the kernel is given, nothing boots off the NIC).
        command += ["-netdev", "user,id=net0,ipv6=off", "-device"]
        command += ["virtio-net-pci,netdev=net0,romfile="]
    command += ["-display", "none", "-no-user-config", "-nodefaults", "-serial", "stdio"]
    return [*command, "-no-reboot"]


class GuestRun:
    """A guest started in the background (its console goes to JOB/console.txt); `wait` for its
    result. The guest is killed if it is still running when the `with` block ends."""

    def __init__(self, command: list[str], job: Path, timeout: float, *, tail: int) -> None:
        self.job = job
        self.timeout = timeout
        self.tail = tail
        self.t0 = time.monotonic()
        self.console_path = job / "console.txt"
        with open(self.console_path, "wb") as out:
            # Niced: the guest runs beside the rest of the suite (tests/early.py), whose daemons
            # keep deadlines; the guest has minutes to spare and takes the cycles they leave.
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def __enter__(self) -> GuestRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def console(self) -> str:
        """The last `tail` characters of the guest's console so far."""
        return self.console_path.read_text(errors="replace")[-self.tail :]

    def logs(self) -> str:
        """The ends of the job's *.log files (what the guest's processes wrote)."""
        return "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.job.glob("*.log"))
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> dict[str, Any]:
        """Wait for the guest to end; return the result.json it wrote into the job, with its
        console (`console`) and its wall time (`boot_s`). VMError if it ran past the timeout
        (counted from its start) or wrote no result, with the console and the job's logs."""
        left = self.timeout - (time.monotonic() - self.t0)
        try:
            self.proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise VMError(
                f"the guest ran past {self.timeout:.0f} s; console:\n{self.console()}{self.logs()}"
            ) from None
        elapsed = time.monotonic() - self.t0
        result_file = self.job / "result.json"
        if not result_file.is_file():
            raise VMError(
                f"the guest wrote no result (qemu exit {self.proc.returncode}); console:\n"
                f"{self.console()}{self.logs()}"
            )
        result: dict[str, Any] = json.loads(result_file.read_text())
        result["console"] = self.console()
        result["boot_s"] = round(elapsed, 1)
        return result


def run_guest(command: list[str], job: Path, timeout: float, *, tail: int) -> dict[str, Any]:
    """Run a guest to its end; return its result (see GuestRun.wait)."""
    with GuestRun(command, job, timeout, tail=tail) as guest:
        return guest.wait()


def boot(*, timeout: float = 420.0, rows: int = 100_000, keep: bool = False) -> dict[str, Any]:
    """Boot the guest on a fresh batch and return what guest.py found (plus `console` and
    `boot_s`); VMError if it did not report."""
    if shutil.which(QEMU) is None:
        raise VMError(f"{QEMU} not found: install the Debian package qemu-system-x86")
    kernel, initramfs = prepare()
    job = Path(tempfile.mkdtemp(prefix="nc-numa-vm-"))
    try:
        batch_id = "vm-batch-1"
        models = publish_batch(job, batch_id, rows)
        sizes = {p.name: p.stat().st_size for p in (job / "staging" / batch_id).iterdir()}
        (job / "job.json").write_text(
            json.dumps({"root": str(ROOT), "batch_id": batch_id, "models": models})
        )
        result = run_guest(qemu_command(kernel, initramfs, job), job, timeout, tail=6000)
        result["kernel"] = kernel.version
        result["files"] = sizes
        result["footers"] = footers(job / "staging" / batch_id)
        result["rows"] = rows
        result["models"] = models
        if keep:
            result["job"] = str(job)
        return result
    finally:
        if not keep:
            shutil.rmtree(job, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: boot, print the result as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=420.0, help="seconds for the whole guest run")
    p.add_argument("--rows", type=int, default=100_000, help="rows per model in the batch")
    p.add_argument("--keep", action="store_true", help="keep the job folder (batch, agent logs)")
    args = p.parse_args(argv)
    try:
        result = boot(timeout=args.timeout, rows=args.rows, keep=args.keep)
    except VMError as e:
        print(f"numa_vm: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
