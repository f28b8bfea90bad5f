"""Boot systemd as PID 1 in a two-node QEMU guest (TCG) over the host's read-only root.

    python tests/systemd_vm/vm.py [--keep] [--timeout S] [--rows N]

prints the guest's findings (guest.py's result.json) as JSON, with an external PostgreSQL
(pg.py) started on the host for the guest. The guest is the one of
tests/numa_vm/ (2 vCPUs, NUMA nodes 0 and 1 of 1 GiB each, the Debian kernel fetched once with
apt-get download), with a different init:

- the host's / comes in read-only over 9p and becomes the lower layer of an overlayfs whose
  upper layer is a tmpfs in the guest, so the guest's / is writable (apt-installed files,
  /etc/passwd for systemd-sysusers, /etc/systemd/system for the units) and the host is never
  written;
- a second 9p share (the job folder) is mounted at /nc-job: it carries in the files to lay over
  the root (tree/: a boot target, the driver unit, an empty fstab, masks) and carries out
  result.json and the driver's log;
- eth0 (QEMU user networking) gets 10.0.2.15/24, so the guest reaches the host's loopback at
  10.0.2.2 (the external PostgreSQL of the test);
- then `switch_root` to /lib/systemd/systemd, which boots `nc-test.target` (kernel command
  line `systemd.unit=`): basic.target plus the driver, guest.py, run as a service.

The kernel, its modules (virtio, 9p, overlay, virtio_net) and the initramfs are cached under
tests/systemd_vm/.cache/.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from tests.numa_vm import vm as numa_vm  # noqa: E402

CACHE = HERE / ".cache"
QEMU = numa_vm.QEMU
BUSYBOX = numa_vm.BUSYBOX
VMError = numa_vm.VMError
CPU = "max"
GUEST_NET = "10.0.2.15"
HOST_FROM_GUEST = "10.0.2.2"

MODULES = (*numa_vm.MODULES, "overlay")  # numa_vm's include the network (virtio_net)

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod /modules/$m.ko || echo "NSV: insmod $m failed"
done
set -e
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
layers=lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work
mount -t overlay -o $layers,xino=off,index=off overlay /newroot
mkdir -p /newroot/nc-job
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /newroot/nc-job
cp -a /newroot/nc-job/tree/. /newroot/
# A fresh /run, and no /.dockerenv (the host may be a container): systemd must see a VM, or it
# would ignore the kernel command line.
mount -t tmpfs -o mode=755,nosuid,nodev run /newroot/run
rm -f /newroot/.dockerenv
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
set +e
echo "NSV: init ready at $(cut -d' ' -f1 /proc/uptime) s"
umount /proc /sys
umount /dev
exec switch_root /newroot /lib/systemd/systemd --unit=nc-test.target
"""


@dataclass(frozen=True)
class Kernel:
    """A kernel image and the guest's modules, in load order."""

    version: str
    vmlinuz: Path
    modules: tuple[Path, ...]


def cached_kernel() -> Kernel | None:
    """The kernel already under .cache/, if a complete one is there."""
    for d in sorted(CACHE.glob("kernel-*"), reverse=True):
        manifest = d / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            if tuple(m.get("wanted", ())) == MODULES:
                return Kernel(m["version"], d / "vmlinuz", tuple(d / p for p in m["modules"]))
    return None


def fetch_kernel() -> Kernel:
    """apt-get download the Debian kernel, keep its vmlinuz and the guest's modules."""
    package = numa_vm.kernel_package()
    version = package.removeprefix("linux-image-")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kernel-", dir=CACHE))
    try:
        numa_vm.run(["apt-get", "download", package], cwd=work)
        [deb] = work.glob("*.deb")
        numa_vm.run(["dpkg", "-x", str(deb), str(work / "x")])
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
            data = found[0].read_bytes()
            if found[0].name.endswith(".ko.xz"):
                data = lzma.decompress(data)
            (dest / "modules" / f"{name}.ko").write_bytes(data)
            names.append(f"modules/{name}.ko")
        for needed in ("9p", "overlay", "virtio_net"):
            if f"modules/{needed}.ko" not in names:
                raise VMError(f"{package} has no {needed} module")
        (dest / "manifest.json").write_text(
            json.dumps({"version": version, "modules": names, "wanted": MODULES})
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kernel = cached_kernel()
    assert kernel is not None
    return kernel


def build_initramfs(kernel: Kernel) -> Path:
    """The busybox initramfs for `kernel`, built once per content under .cache/."""
    if not BUSYBOX.is_file():
        raise VMError(f"{BUSYBOX} is missing: install the Debian package busybox-static")
    busybox = BUSYBOX.read_bytes()
    if not numa_vm.is_static(busybox):
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
    entries = [(name, d, b"", 0) for name in ("bin", "dev", "proc", "sys", "modules")]
    entries += [("dev/console", c, b"", 5 << 8 | 1), ("dev/null", c | 0o066, b"", 1 << 8 | 3)]
    entries += [("bin/busybox", x, busybox, 0), ("init", x, INIT.encode(), 0)]
    entries += [("modules.order", f, order.encode(), 0)]
    entries += [(n, f, b, 0) for n, b in modules]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(numa_vm.cpio_newc(entries), compresslevel=1))
    tmp.rename(path)
    return path


def prepare() -> tuple[Kernel, Path]:
    """The kernel and initramfs, from the cache or built into it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel = cached_kernel() or fetch_kernel()
        return kernel, build_initramfs(kernel)


# Units that have nothing to do in the guest, or would slow its boot under TCG: udev (the
# guest's modules are in the initramfs, /dev is devtmpfs), and services that the host enabled.
MASKED = (
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "systemd-logind.service",
    "systemd-random-seed.service",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-modules-load.service",
    "modprobe@.service",
    "ldconfig.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service",
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-clean.timer",
)

TARGET = """[Unit]
Description=numa-coordinator systemd test
Requires=basic.target
After=basic.target
Wants=nc-driver.service
AllowIsolate=yes
"""

DRIVER = """[Unit]
Description=numa-coordinator systemd test driver (guest.py)
After=basic.target

[Service]
Type=exec
Environment=PYTHONDONTWRITEBYTECODE=1 HOME=/root
ExecStart={python} {guest} /nc-job
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
# The result is on the 9p share already: power off at once, without the orderly shutdown.
ExecStopPost=/bin/sync
ExecStopPost=/bin/systemctl poweroff --force --force
"""


def write_tree(job: Path, python: Path) -> None:
    """The files laid over the guest's root before systemd starts."""
    tree = job / "tree"
    unitdir = tree / "etc" / "systemd" / "system"
    unitdir.mkdir(parents=True)
    (tree / "etc" / "fstab").write_text("# the systemd VM test mounts nothing from fstab\n")
    (unitdir / "nc-test.target").write_text(TARGET)
    (unitdir / "nc-driver.service").write_text(
        DRIVER.format(python=python, guest=HERE / "guest.py")
    )
    for name in MASKED:
        os.symlink("/dev/null", unitdir / name)


def qemu_command(kernel: Kernel, initramfs: Path, job: Path) -> list[str]:
    """The QEMU command line of the two-node guest with systemd as init."""
    append = (
        "console=ttyS0 loglevel=3 panic=-1 systemd.unit=nc-test.target "
        "systemd.show_status=error systemd.firstboot=no systemd.journald.forward_to_console=0"
    )
    return [
        QEMU,
        *("-accel", "tcg", "-cpu", CPU, "-smp", "2", "-m", "2048"),
        *("-object", "memory-backend-ram,id=m0,size=1024M"),
        *("-object", "memory-backend-ram,id=m1,size=1024M"),
        *("-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1"),
        *("-numa", "dist,src=0,dst=1,val=21"),
        *("-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs), "-append", append),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={job},mount_tag=job,security_model=none,multidevs=remap",
        *("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"),
        *("-display", "none", "-no-user-config", "-nodefaults", "-serial", "stdio"),
        "-no-reboot",
    ]


def boot(spec: dict[str, Any], *, timeout: float = 600.0, keep: bool = False) -> dict[str, Any]:
    """Boot the guest with `spec` as the job (job.json) and return guest.py's result (plus
    `console` and `boot_s`); VMError if it did not report."""
    if shutil.which(QEMU) is None:
        raise VMError(f"{QEMU} not found: install the Debian package qemu-system-x86")
    kernel, initramfs = prepare()
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    job = Path(tempfile.mkdtemp(prefix="nc-systemd-vm-"))
    try:
        (job / "job.json").write_text(json.dumps({"root": str(ROOT), **spec}))
        write_tree(job, python)
        result = numa_vm.run_guest(qemu_command(kernel, initramfs, job), job, timeout, tail=8000)
        result["kernel"] = kernel.version
        if keep:
            result["job"] = str(job)
        return result
    finally:
        if not keep:
            shutil.rmtree(job, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: boot, print the result as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole guest run")
    p.add_argument("--keep", action="store_true", help="keep the job folder")
    p.add_argument("--rows", type=int, default=2000, help="rows per model in each batch")
    args = p.parse_args(argv)
    from tests.systemd_vm import pg

    try:
        with pg.server() as server:
            result = boot({"pg": server, "rows": args.rows}, timeout=args.timeout, keep=args.keep)
    except VMError as e:
        print(f"systemd_vm: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
