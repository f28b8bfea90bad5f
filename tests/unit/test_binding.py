"""NUMA binding checks: the kernel's memory policy and CPU mask, read back under real numactl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agents import binding
from coordinator.core.errors import BindingError

ROOT = Path(__file__).resolve().parents[2]

needs_numactl = pytest.mark.skipif(
    shutil.which("numactl") is None, reason="numactl not installed (Debian numactl)"
)

# Runs check() in a child and reports the outcome as one JSON line; exit 0 ok, 3 BindingError.
PROBE = """
import json, sys
from agents.binding import check
from coordinator.core.errors import BindingError
kw = json.loads(sys.argv[1])
try:
    b = check(0, **kw)
except BindingError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(3)
print(json.dumps(b.as_dict()))
"""


def probe(numactl_args: list[str], **check_kw: str) -> tuple[int, dict[str, object]]:
    """Run `check(0, **check_kw)` in a Python started under `numactl numactl_args`."""
    proc = subprocess.run(
        ["numactl", *numactl_args, sys.executable, "-c", PROBE, json.dumps(check_kw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def fake_sysfs(root: Path, cpulist: str) -> Path:
    """A sysfs root whose node 0 has the CPUs `cpulist`."""
    node = root / "sys/devices/system/node/node0"
    node.mkdir(parents=True)
    (node / "cpulist").write_text(cpulist + "\n")
    return root


def cpus_outside(cpus: set[int]) -> str:
    """A CPU list disjoint from `cpus`."""
    return str(max(cpus) + 100)


# --- parse_cpulist -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", (0,)),
        ("0-3", (0, 1, 2, 3)),
        ("0-3,8", (0, 1, 2, 3, 8)),
        ("0-1,36-37\n", (0, 1, 36, 37)),
        ("8,0-2", (0, 1, 2, 8)),
        ("0-2,1-3", (0, 1, 2, 3)),
        ("", ()),
        ("\n", ()),
        ("5,", (5,)),
    ],
)
def test_parse_cpulist(text: str, cpus: tuple[int, ...]) -> None:
    assert binding.parse_cpulist(text) == cpus


def test_parse_cpulist_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        binding.parse_cpulist("0-x")


def test_node_cpus_reads_the_node_cpulist(tmp_path: Path) -> None:
    assert binding.node_cpus(0, fake_sysfs(tmp_path, "0-3,18-21")) == (0, 1, 2, 3, 18, 19, 20, 21)


def test_node_cpus_of_a_missing_node_is_a_binding_error(tmp_path: Path) -> None:
    with pytest.raises(BindingError, match="node 7"):
        binding.node_cpus(7, tmp_path)


# --- this process --------------------------------------------------------------------------


def test_the_test_process_has_the_default_policy_and_its_own_affinity() -> None:
    b = binding.current()
    assert b.policy == "default"
    assert b.mems == ()
    assert b.cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert b.as_dict() == {"policy": "default", "mems": [], "cpus": list(b.cpus)}


def test_check_refuses_an_unbound_process() -> None:
    with pytest.raises(BindingError, match=r"memory policy is default.*--membind=0"):
        binding.check(0)


# --- under numactl -------------------------------------------------------------------------


@needs_numactl
def test_check_passes_under_membind() -> None:
    rc, out = probe(["--membind=0", "--cpunodebind=0"])
    assert rc == 0, out
    assert out["policy"] == "bind"
    assert out["mems"] == [0]


@needs_numactl
def test_check_refuses_interleave() -> None:
    rc, out = probe(["--interleave=0"])
    assert rc == 3
    assert "memory policy is interleave" in str(out["error"])


@needs_numactl
def test_check_refuses_preferred() -> None:
    rc, out = probe(["--preferred=0"])
    assert rc == 3
    assert "memory policy is preferred" in str(out["error"])


@needs_numactl
def test_check_refuses_cpus_outside_the_node(tmp_path: Path) -> None:
    """Bound memory is not enough: a CPU mask reaching outside the node is refused."""
    mine = set(os.sched_getaffinity(0))
    root = fake_sysfs(tmp_path, cpus_outside(mine))
    rc, out = probe(["--membind=0"], sysfs_root=str(root))
    assert rc == 3
    assert "outside node 0" in str(out["error"])


@needs_numactl
def test_check_accepts_cpus_inside_the_node_from_sysfs(tmp_path: Path) -> None:
    first = min(os.sched_getaffinity(0))
    root = fake_sysfs(tmp_path, f"{first}")
    rc, out = probe(["--membind=0", f"--physcpubind={first}"], sysfs_root=str(root))
    assert rc == 0, out
    assert out["cpus"] == [first]


@needs_numactl
def test_a_configured_cpu_list_overrides_the_node_cpus() -> None:
    mine = sorted(os.sched_getaffinity(0))
    inside = ",".join(str(c) for c in mine)
    rc, out = probe(["--membind=0"], cpus=inside)
    assert rc == 0, out
    rc, out = probe(["--membind=0"], cpus=cpus_outside(set(mine)))
    assert rc == 3
    assert "outside node 0" in str(out["error"])


@needs_numactl
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="machine fact: fewer than two CPUs")
def test_a_mask_wider_than_the_configured_cpus_is_refused() -> None:
    first, *rest = sorted(os.sched_getaffinity(0))
    rc, out = probe(["--membind=0"], cpus=str(first))
    assert rc == 3
    assert str(rest[0]) in str(out["error"])
