"""The container image recipe (Containerfile): the wheel its build stage builds, installed into a
fresh venv, runs its console scripts; and the recipe's run stage carries no build tools, runs as a
non-root user, installs numactl and starts only commands the wheel provides.

No container engine is needed (nor present on the developers' machines): the wheel is built the
way the build stage builds it (`python -m pip wheel --no-deps` on a folder holding exactly what
the Containerfile copies), and the Containerfile's text is checked directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import anyio
import pytest
from packaging.requirements import Requirement

from coordinator.planner.k8s import render_manifests
from coordinator.planner.layout import hardware_topology, load_layout
from coordinator.planner.plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = set(PYPROJECT["project"]["scripts"])
BUILD_COMMAND = "python -m pip wheel --no-deps --wheel-dir /wheels ."
# What must never reach the run stage: compilers, build tools, wheel building, dev headers.
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|cc|make|build-essential|python3?-dev|[\w.+-]+-dev"
    r"|pip wheel|python -m build|setuptools|cython)\b"
)


# ------------------------------------------------------------------ the Containerfile's text


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(text):
        if ins[0] == "FROM":
            stages.append([])
        if not stages:
            raise AssertionError(f"{ins[0]} before the first FROM")
        stages[-1].append(ins)
    return stages


def _command_words(args: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT: exec form (JSON) or shell form."""
    if args.startswith("["):
        words = json.loads(args)
        assert isinstance(words, list)
        return [str(w) for w in words]
    return args.split()


def containerfile_problems(text: str) -> list[str]:
    """Every rule the image recipe must keep, as one message per break."""
    problems: list[str] = []
    stages = _stages(text)
    if len(stages) < 2:
        return [f"Containerfile: {len(stages)} stage(s); wants a build stage and a run stage"]
    for stage in stages:
        base = stage[0][1].split()[0]
        if not re.fullmatch(r"([\w.-]+/)*python:3\.11-slim(-\w+)?", base):
            problems.append(f"Containerfile: FROM {base} is not a slim Python 3.11 image")
    build, run = stages[0], stages[-1]
    if not any(w == "RUN" and BUILD_COMMAND in a for w, a in build):
        problems.append(f"Containerfile: the build stage does not run `{BUILD_COMMAND}`")
    for word, args in run:
        if word == "RUN" and BUILD_TOOLS.search(args):
            problems.append(f"Containerfile: the run stage builds or installs build tools: {args}")
        if word in ("COPY", "ADD") and "--from=" not in args:
            problems.append(f"Containerfile: the run stage copies sources in: {word} {args}")
    runs = " && ".join(a for w, a in run if w == "RUN")
    if not re.search(r"apt-get install\b[^&;]*\bnumactl\b", runs):
        problems.append("Containerfile: the run stage does not apt-get install numactl")
    if not re.search(r"pip install\b[^&;]*--only-binary=:all:[^&;]*\.whl", runs):
        problems.append(
            "Containerfile: the run stage does not install the wheel with --only-binary=:all:"
            " (a dependency without a wheel would need a compiler)"
        )
    users = [a for w, a in run if w == "USER"]
    if not users:
        problems.append("Containerfile: the run stage has no USER: it would run as root")
    elif users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"Containerfile: USER {users[-1]} is root")
    starts = [(w, a) for w, a in run if w in ("CMD", "ENTRYPOINT")]
    if not starts:
        problems.append("Containerfile: the run stage has no CMD or ENTRYPOINT")
    for word, args in starts:
        argv = _command_words(args)
        if not argv or argv[0] not in SCRIPTS:
            problems.append(
                f"Containerfile: {word} {args} does not start a console script of pyproject"
                f" ({', '.join(sorted(SCRIPTS))})"
            )
    return problems


def test_containerfile_keeps_its_rules() -> None:
    assert containerfile_problems(CONTAINERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "want"),
    [
        (lambda t: t + "RUN apt-get install -y gcc\n", "build tools"),
        (lambda t: t + "RUN apt-get install -y build-essential\n", "build tools"),
        (lambda t: t + "RUN pip wheel --no-deps .\n", "build tools"),
        (lambda t: t + "RUN apt-get install -y libpq-dev\n", "build tools"),
        (lambda t: t + "COPY coordinator /src/coordinator\n", "copies sources"),
        (lambda t: t + "USER root\n", "is root"),
        (lambda t: t + "USER 0:0\n", "is root"),
        (lambda t: re.sub(r"(?m)^USER .*\n", "", t), "no USER"),
        (lambda t: t.replace("numactl", "numad"), "numactl"),
        (lambda t: t.replace("--only-binary=:all: ", ""), "--only-binary"),
        (lambda t: t + 'CMD ["coordinatorX", "--config", "x"]\n', "console script"),
        (lambda t: t + "ENTRYPOINT python -m coordinator\n", "console script"),
        (lambda t: re.sub(r"(?m)^CMD .*\n", "", t), "no CMD"),
        (lambda t: t.replace(BUILD_COMMAND, "python -m pip wheel ."), "build stage"),
        (lambda t: t.replace("python:3.11-slim-bookworm AS run", "python:3.11 AS run"), "slim"),
    ],
)
def test_containerfile_rules_catch_a_break(edit: object, want: str) -> None:
    assert callable(edit)
    problems = containerfile_problems(edit(CONTAINERFILE.read_text()))
    assert any(want in p for p in problems), problems


def test_one_stage_is_refused() -> None:
    text = CONTAINERFILE.read_text()
    problems = containerfile_problems(
        text[text.index("FROM docker.io/library/python:3.11-slim-bookworm AS run") :]
    )
    assert problems and "1 stage(s)" in problems[0], problems


def test_manifest_commands_are_in_the_image() -> None:
    """Every container of `plan --k8s` starts a console script, or numactl running one."""
    layout = load_layout(ROOT / "config" / "layout.seed.toml")
    manifests = render_manifests(make_plan(layout, hardware_topology(layout)))
    seen = 0
    for name, obj in manifests.items():
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            argv = list(c["command"])
            if argv[0] == "numactl":
                argv = [w for w in argv[1:] if not w.startswith("-")]
            assert argv[0] in SCRIPTS, f"{name}: {c['command']} starts no console script"
            seen += 1
    assert seen >= 3  # the coordinator and one agent per NUMA node


# ------------------------------------------------------------------ the wheel, built and installed


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built like the Containerfile's build stage: from a folder holding only what it
    COPYs, with pip's build isolation (setuptools>=77 comes from the package index)."""
    src = tmp_path_factory.mktemp("src")
    copied = [a for w, a in _stages(CONTAINERFILE.read_text())[0] if w == "COPY"]
    assert copied, "the build stage copies nothing"
    for args in copied:
        *names, dest = args.split()
        into = dest.endswith("/") or len(names) > 1  # COPY's rule: a folder when it ends in /
        for name in names:
            path, target = ROOT / name, src / dest
            if path.is_dir():  # COPY copies a folder's contents, not the folder itself
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target = target / path.name if into else target
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    out = tmp_path_factory.mktemp("wheels")
    argv = BUILD_COMMAND.replace("/wheels", str(out)).split()
    built = _run([sys.executable, *argv[1:]], cwd=src)
    if built.returncode != 0:
        offline = re.search(
            r"No matching distribution found for setuptools|NewConnectionError|"
            r"Temporary failure in name resolution|Network is unreachable",
            built.stdout + built.stderr,
        )
        if offline:  # a fact of the machine: the build backend cannot be fetched
            pytest.skip(f"the package index is unreachable for the build backend: {offline[0]}")
        raise AssertionError(f"the wheel build failed:\n{built.stdout}\n{built.stderr}")
    wheels = list(out.glob("*.whl"))
    assert [w.name for w in wheels] == ["numa_coordinator-0.1.0-py3-none-any.whl"], wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_the_packages_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"coordinator", "agents", "numa_coordinator-0.1.0.dist-info"}, tops
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/") or "conftest" in n]
    # every module of the checkout's packages is in it (a forgotten __init__.py drops a package)
    want = {
        p.relative_to(ROOT).as_posix()
        for pkg in ("coordinator", "agents")
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert want - set(names) == set()


@pytest.mark.slow
def test_wheel_metadata_matches_pyproject(wheel: Path) -> None:
    z = zipfile.ZipFile(wheel)
    meta = Parser().parsestr(z.read("numa_coordinator-0.1.0.dist-info/METADATA").decode())
    # Compared as parsed requirements: the wheel writes each in a normal form (extras and
    # specifiers sorted), which need not be the form pyproject.toml spells.
    requires = {Requirement(r) for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r}
    assert requires == {Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    assert meta["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    entry = z.read("numa_coordinator-0.1.0.dist-info/entry_points.txt").decode()
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in entry


@pytest.mark.slow
def test_wheel_installs_and_its_scripts_run(wheel: Path, tmp_path: Path) -> None:
    """Into a fresh venv with `--no-deps --no-index` (offline); the runtime dependencies come from
    the test's own environment through a .pth path line, which adds that folder to sys.path
    behind the venv's own site-packages without running its .pth files (so the checkout's
    editable install there is not picked up: the packages must come from the wheel)."""
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    inst = _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         "--no-cache-dir", str(wheel)]
    )  # fmt: skip
    assert inst.returncode == 0, inst.stdout + inst.stderr
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    (site / "zz_test_deps.pth").write_text(str(Path(anyio.__file__).resolve().parents[1]) + "\n")

    where = _run(
        [str(py), "-c", "import coordinator, agents; print(coordinator.__file__, agents.__file__)"],
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(site.resolve()), where.stdout

    for script in sorted(SCRIPTS):
        exe = venv / "bin" / script
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing"
        helped = _run([str(exe), "--help"], cwd=tmp_path)
        assert helped.returncode == 0, f"{script} --help: {helped.stderr}"
        assert "usage:" in helped.stdout and script in helped.stdout, helped.stdout
