"""The systemd units in systemd/: they verify, they are hardened, and they say what the docs say.

There is no systemd as PID 1 here, so the units are checked offline with systemd-analyze (Debian
package `systemd`); the notify protocol itself is tested against the real daemon in
test_notify.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ROOT / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
MOUNTS = sorted(UNITS.glob("*.mount"))
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd)",
)


def instance_name(unit: Path) -> str:
    """A template is checked as its instance for node 0."""
    return unit.name.replace("@.", "@0.")


def unit_copies(tmp_path: Path) -> dict[str, Path]:
    """Every unit copied into tmp_path with the commands pointed at binaries that exist here."""
    bindir = Path(sys.executable).parent
    out = {}
    for unit in [*SERVICES, *MOUNTS]:
        text = unit.read_text()
        for tool in ("coordinatord", "coordinatorctl", "staging-agent"):
            found = bindir / tool if (bindir / tool).exists() else shutil.which(tool)
            assert found, f"{tool} is not installed (pip install -e .)"
            text = text.replace(f"/usr/bin/{tool}", str(found))
        numactl = shutil.which("numactl")
        assert numactl, "numactl is not installed (Debian package numactl)"
        text = text.replace("/usr/bin/numactl", numactl)
        dest = tmp_path / instance_name(unit)
        dest.write_text(text)
        out[unit.name] = dest
    return out


def settings(unit: Path) -> dict[str, list[str]]:
    """KEY -> every value it is given in the unit file (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_units_that_the_docs_name_exist():
    names = {p.name for p in UNITS.iterdir()}
    assert {"numa-coordinator.service", "numa-staging-agent@.service"} <= names
    assert {
        r"dev-shm-numa\x2dcoordinator-node0.mount",
        r"dev-shm-numa\x2dcoordinator-node1.mount",
    } <= names
    assert (UNITS / "sysusers.d" / "numa-coordinator.conf").is_file()
    assert (UNITS / "tmpfiles.d" / "numa-coordinator.conf").is_file()


@needs_analyze
@pytest.mark.parametrize("name", [p.name for p in [*SERVICES, *MOUNTS]])
def test_systemd_analyze_verify_passes_without_warnings(name, tmp_path):
    copies = unit_copies(tmp_path)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copies[name])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    ours = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if any(p.name in line for p in copies.values())
    ]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@needs_analyze
@pytest.mark.parametrize("name", [p.name for p in SERVICES])
def test_every_service_is_hardened_to_an_exposure_of_at_most_2_5(name, tmp_path):
    copies = unit_copies(tmp_path)
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(copies[name])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_coordinator_unit_is_a_notify_service_with_watchdog_reload_and_restart():
    s = settings(UNITS / "numa-coordinator.service")
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [
        "/usr/bin/coordinatord --config /etc/numa-coordinator/coordinator.toml"
    ]
    assert "--with-agents" not in s["ExecStart"][0]  # agents are units of their own
    assert s["ExecReload"][0].startswith("/usr/bin/coordinatorctl reload")
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["WatchdogSec"][0] not in ("0", "infinity")
    assert s["RuntimeDirectoryMode"] == ["0750"]
    assert s["UMask"] == ["0027"]
    assert s["User"] == ["numa-coordinator"]


@pytest.mark.parametrize("name", [p.name for p in SERVICES])
def test_every_service_carries_the_hardening_the_issue_lists(name):
    s = settings(UNITS / name)
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0027",
    }.items():
        assert s.get(key) == [value], f"{name}: {key}={s.get(key)}"
    assert "@system-service" in s["SystemCallFilter"]
    assert s["RestrictAddressFamilies"]
    assert s.get("ReadWritePaths"), f"{name}: ProtectSystem=strict needs ReadWritePaths"


def test_agent_template_binds_memory_and_cpus_to_its_node_and_follows_the_coordinator():
    s = settings(UNITS / "numa-staging-agent@.service")
    [cmd] = s["ExecStart"]
    argv = cmd.split()
    assert "--membind=%i" in argv and "--cpunodebind=%i" in argv
    assert argv[argv.index("--node") + 1] == "%i"
    assert "staging-agent" in argv[argv.index("--cpunodebind=%i") + 1]
    assert s["BindsTo"] == ["numa-coordinator.service"]
    assert s["PartOf"] == ["numa-coordinator.service"]
    assert s["After"] == ["numa-coordinator.service"]
    # The node's tmpfs is the node-local mount, not whatever /dev/shm is.
    assert s["RequiresMountsFor"] == ["/dev/shm/numa-coordinator/node%i"]
    assert s["BindPaths"] == ["/dev/shm/numa-coordinator/node%i"]


@pytest.mark.parametrize("unit", MOUNTS, ids=lambda p: p.name)
def test_each_node_tmpfs_mount_binds_its_pages_to_its_own_node(unit):
    s = settings(unit)
    [where] = s["Where"]
    node = re.fullmatch(r"/dev/shm/numa-coordinator/node(\d+)", where)
    assert node, where
    opts = s["Options"][0].split(",")
    assert f"mpol=bind:{node.group(1)}" in opts
    assert any(o.startswith("size=") for o in opts)
    assert s["Type"] == ["tmpfs"]
    if shutil.which("systemd-escape"):
        escaped = subprocess.run(
            ["systemd-escape", "--path", "--suffix=mount", where],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert unit.name == escaped


def test_fstab_example_binds_each_node_tmpfs_to_its_node():
    lines = [
        line.split()
        for line in (UNITS / "fstab.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) >= 2
    for _what, where, fstype, opts, *_ in lines:
        node = re.fullmatch(r"/dev/shm/numa-coordinator/node(\d+)", where)
        assert node and fstype == "tmpfs"
        assert f"mpol=bind:{node.group(1)}" in opts.split(",")


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles not installed (Debian package systemd)",
)
def test_sysusers_and_tmpfiles_make_the_user_and_its_folders_with_their_modes(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for f in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / f).touch()
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(UNITS / "sysusers.d/numa-coordinator.conf")],
        check=True,
        capture_output=True,
    )
    [entry] = [
        line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("numa-coordinator:")
    ]
    uid, gid = int(entry[2]), int(entry[3])
    assert entry[6] == "/usr/sbin/nologin"
    r = subprocess.run(
        [
            "systemd-tmpfiles",
            "--create",
            f"--root={root}",
            str(UNITS / "tmpfiles.d/numa-coordinator.conf"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    expect = {
        "run/numa-coordinator": (0o750, uid),
        "var/lib/numa-coordinator": (0o750, uid),
        "data/hot/staging": (0o2770, uid),
        "data/lake": (0o750, uid),
        "dev/shm/numa-coordinator/node0": (0o750, uid),
        "dev/shm/numa-coordinator/node1": (0o750, uid),
        "etc/numa-coordinator": (0o750, 0),
    }
    for rel, (mode, owner) in expect.items():
        st = (root / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, gid), rel
