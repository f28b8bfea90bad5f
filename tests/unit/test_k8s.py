"""coordinatorctl plan --k8s: the seed layout's manifests validate against Kubernetes' OpenAPI
schema offline, the ConfigMap's TOML loads as a coordinator config, and every semantic rule of
check_manifests fails on a manifest that breaks it."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from coordinator.core.config import load_config
from coordinator.core.errors import LayoutError
from coordinator.planner.k8s import (
    K8sOptions,
    check_manifests,
    render_manifests,
    secret_layout,
    to_yaml,
    write_k8s,
)
from coordinator.planner.layout import hardware_topology, load_layout
from coordinator.planner.plan import Plan, make_plan

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "config" / "layout.seed.toml"
K8S_VERSION = "1.31.0"  # the k3s release line the manifests target; bump deliberately


@pytest.fixture(scope="module")
def plan() -> Plan:
    layout = load_layout(SEED)
    return make_plan(layout, hardware_topology(layout))


@pytest.fixture(scope="module")
def written(plan: Plan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s")
    write_k8s(plan, out)
    return out


def _load(path: Path) -> dict[str, Any]:
    obj = yaml.safe_load(path.read_text())
    assert isinstance(obj, dict)
    return obj


def test_every_manifest_validates_strictly(written: Path) -> None:
    kustomization = _load(written / "kustomization.yaml")
    names = kustomization["resources"]
    assert sorted(names) == sorted(
        p.name for p in written.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    kinds = []
    for name in names:
        obj = _load(written / name)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        kinds.append(obj["kind"])
    assert sorted(kinds) == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "DaemonSet",
            "DaemonSet",
        ]
    )


def test_strict_validation_catches_a_misspelt_field(written: Path) -> None:
    obj = _load(written / "agent-node0.yaml")
    obj["spec"]["template"]["spec"]["nodeSelecter"] = obj["spec"]["template"]["spec"].pop(
        "nodeSelector"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_no_secret_is_generated(written: Path) -> None:
    for path in written.glob("*.yaml"):
        assert _load(path).get("kind") != "Secret", path


def test_the_configmap_is_a_valid_coordinator_config(written: Path, tmp_path: Path) -> None:
    data = _load(written / "configmap.yaml")["data"]["coordinator.toml"]
    (tmp_path / "coordinator.toml").write_text(data)
    config = load_config(tmp_path / "coordinator.toml")
    assert config.agents.listen == "tcp://0.0.0.0:7465"
    assert config.metrics_listen == "0.0.0.0:9465"
    assert config.host.id == "k3s"
    assert [n.id for n in config.nodes] == [0, 1]
    assert all(n.remote for n in config.nodes)
    assert config.agents.tls_cert.startswith("/etc/numa-coordinator/tls/")
    assert "{node}" in config.agents.agent_tls_cert


def test_coordinator_deployment(written: Path) -> None:
    dep = _load(written / "coordinator-deployment.yaml")
    assert dep["spec"]["replicas"] == 2
    container = dep["spec"]["template"]["spec"]["containers"][0]
    # Ready on the leader alone; alive on leader and standby alike (test_hosts.py runs both)
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    ports = {
        p["name"]: p["port"] for p in _load(written / "coordinator-service.yaml")["spec"]["ports"]
    }
    assert ports == {"agents": 7465, "metrics": 9465}
    assert _load(written / "coordinator-pdb.yaml")["spec"]["minAvailable"] == 1


def test_agent_daemonsets_follow_the_plan(written: Path) -> None:
    # One agent per NUMA node, on the node's largest worker; its tmpfs an eighth of that VM.
    for node, vm, tmpfs in ((0, "slm-heavy", "14Gi"), (1, "data", "7Gi")):
        spec = _load(written / f"agent-node{node}.yaml")["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {
            "numa-coordinator/numa-node": str(node),
            "numa-coordinator/vm": vm,
        }
        cmd = spec["containers"][0]["command"]
        # Inside its worker VM, whose guest has one NUMA node (0): bound there, serving node N.
        assert cmd[:8] == [
            "numactl",
            "--membind=0",
            "--cpunodebind=0",
            "staging-agent",
            "--node",
            str(node),
            "--bind-node",
            "0",
        ]
        assert cmd[cmd.index("--connect") + 1].startswith("tcp://numa-coordinator.")
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["tmpfs"]["emptyDir"] == {"medium": "Memory", "sizeLimit": tmpfs}
        assert vols["staging"]["hostPath"]["path"] == "/data/hot/staging"
        assert vols["tls"]["secret"]["secretName"] == f"numa-coordinator-agent-node{node}"


def test_the_generated_manifests_pass_the_semantic_check(plan: Plan) -> None:
    assert check_manifests(plan, render_manifests(plan)) == []


def _broken(plan: Plan, name: str, edit: Any) -> list[str]:
    manifests = copy.deepcopy(render_manifests(plan))
    edit(manifests[name]["spec"]["template"]["spec"])
    return check_manifests(plan, manifests)


def test_selector_on_a_label_the_plan_does_not_emit(plan: Plan) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["nodeSelector"] = {"numa-coordinator/numa-node": "7"}

    assert any("it matches none" in p for p in _broken(plan, "agent-node0.yaml", edit))


def test_a_selector_on_several_workers_would_run_two_agents_for_one_node(plan: Plan) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["nodeSelector"] = {"numa-coordinator/numa-node": "1"}  # data, slm and tasks

    problems = _broken(plan, "agent-node1.yaml", edit)
    assert any(
        "exactly one worker" in p and "k3s-worker-data, k3s-worker-slm, k3s-worker-tasks" in p
        for p in problems
    ), problems


def test_missing_toleration(plan: Plan) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["tolerations"] = [t for t in spec["tolerations"] if t.get("value") != "data"]

    problems = _broken(plan, "agent-node1.yaml", edit)
    assert any("workload=data:NoSchedule" in p and "k3s-worker-data" in p for p in problems)


def _command(edit: Any) -> Any:
    def apply(spec: dict[str, Any]) -> None:
        edit(spec["containers"][0]["command"])

    return apply


def test_numactl_on_a_node_the_guest_lacks(plan: Plan) -> None:
    # node 1's host number where the guest's is meant: data's guest has node 0 only
    def edit(cmd: list[str]) -> None:
        cmd[1:3] = ["--membind=1", "--cpunodebind=1"]
        cmd[cmd.index("--bind-node") + 1] = "1"

    problems = _broken(plan, "agent-node1.yaml", _command(edit))
    assert any(
        "numactl --membind=1 is no NUMA node of vm 'data''s guest (it has node 0)" in p
        for p in problems
    ), problems
    assert any("numactl --cpunodebind=1 is no NUMA node" in p for p in problems), problems


def test_numactl_and_bind_node_disagree(plan: Plan) -> None:
    def drop(cmd: list[str]) -> None:  # without --bind-node the agent checks node 1
        i = cmd.index("--bind-node")
        del cmd[i : i + 2]

    problems = _broken(plan, "agent-node1.yaml", _command(drop))
    assert any(
        "numactl binds node 0/0 but the agent checks its binding against node 1" in p
        for p in problems
    ), problems


def test_agent_claims_another_host_node(plan: Plan) -> None:
    def edit(cmd: list[str]) -> None:
        cmd[cmd.index("--node") + 1] = "0"

    problems = _broken(plan, "agent-node1.yaml", _command(edit))
    assert any(
        "does not serve --node 1, the host NUMA node vm 'data' sits on" in p for p in problems
    ), problems


def test_a_command_without_numactl(plan: Plan) -> None:
    def edit(cmd: list[str]) -> None:
        del cmd[:3]

    problems = _broken(plan, "agent-node0.yaml", _command(edit))
    assert any("is not numactl ... staging-agent" in p for p in problems), problems


def test_tmpfs_over_the_vm_budget(plan: Plan) -> None:
    def edit(spec: dict[str, Any]) -> None:
        for v in spec["volumes"]:
            if "emptyDir" in v:
                v["emptyDir"]["sizeLimit"] = "61Gi"  # the data VM on node 1 has 60 GiB

    assert any(
        "exceeds the memory of k3s-worker-data (60 GiB)" in p
        for p in _broken(plan, "agent-node1.yaml", edit)
    )

    def edit_limit(spec: dict[str, Any]) -> None:
        res = spec["containers"][0]["resources"]
        res["requests"]["memory"] = res["limits"]["memory"] = "1Gi"  # smaller than the 7Gi tmpfs

    assert any(
        "must hold the 7Gi tmpfs" in p for p in _broken(plan, "agent-node1.yaml", edit_limit)
    )


def test_not_guaranteed_or_fractional_cpu(plan: Plan) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["containers"][0]["resources"]["requests"]["cpu"] = "1"

    assert any("not Guaranteed QoS" in p for p in _broken(plan, "agent-node0.yaml", edit))

    def edit_cpu(spec: dict[str, Any]) -> None:
        res = spec["containers"][0]["resources"]
        res["requests"]["cpu"] = res["limits"]["cpu"] = "1500m"

    assert any("not an integer" in p for p in _broken(plan, "agent-node0.yaml", edit_cpu))


def test_write_refuses_manifests_that_contradict_the_plan(plan: Plan, tmp_path: Path) -> None:
    # agents asking for more CPUs than their workers can pin: the kubelet check stops the write
    with pytest.raises(LayoutError, match="asks for 64 CPUs but only 30 of 32"):
        write_k8s(plan, tmp_path, K8sOptions(agent_cpus=64))
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_manifests(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.ctl.main",
            "plan",
            "--layout",
            str(SEED),
            "--k8s",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "kustomization.yaml").is_file()
    assert f"under {tmp_path}" in proc.stdout


def test_the_files_hold_exactly_the_checked_objects(plan: Plan, written: Path) -> None:
    # check_manifests sees the objects; the YAML written must parse back to the very same ones
    for name, obj in render_manifests(plan).items():
        assert _load(written / name) == obj, name


def test_yaml_emitter_round_trips_awkward_values() -> None:
    obj = {
        "a/b": {"empty": {}, "none": [], "text": "line 1\n\n  indented\n", "n": 0, "t": True},
        "list": [{"k": [1, "2", {"x": "y: z"}]}, [], [[1, 2], {"m": 3}], "- not a list"],
    }
    assert yaml.safe_load(to_yaml(obj, "comment")) == obj


def _plan_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.ctl.main", "plan", "--layout", str(SEED), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_cli_flags_set_what_the_layout_does_not_say(tmp_path: Path) -> None:
    proc = _plan_cli(
        *("--k8s", str(tmp_path)),
        *("--namespace", "nc-prod", "--image", "registry.local:5000/team/numa-coordinator:0.2.0"),
        *("--host-id", "prod", "--dsn", "postgresql://numa@db.example:5432/numa"),
        *("--db-secret", "db-pw", "--tls-secret", "coord-tls", "--agent-secret", "agent-{node}"),
        *("--agent-port", "8465", "--metrics-port", "9000", "--agent-cpus", "4"),
        *("--tmpfs-fraction", "0.25"),
        *("--staging-host-path", "/srv/staging", "--lake-host-path", "/srv/lake"),
    )
    assert proc.returncode == 0, proc.stderr
    kustomization = _load(tmp_path / "kustomization.yaml")
    assert kustomization["namespace"] == "nc-prod"
    for name in kustomization["resources"]:
        obj = _load(tmp_path / name)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        meta = obj["metadata"]
        assert (meta["name"] if obj["kind"] == "Namespace" else meta["namespace"]) == "nc-prod"
    dep = _load(tmp_path / "coordinator-deployment.yaml")["spec"]["template"]["spec"]
    [coord] = dep["containers"]
    assert coord["image"] == "registry.local:5000/team/numa-coordinator:0.2.0"
    assert {p["name"]: p["containerPort"] for p in coord["ports"]} == {
        "agents": 8465,
        "metrics": 9000,
    }
    secrets = {v["name"]: v["secret"]["secretName"] for v in dep["volumes"] if "secret" in v}
    assert secrets == {"tls": "coord-tls", "db": "db-pw"}
    toml = _load(tmp_path / "configmap.yaml")["data"]["coordinator.toml"]
    (tmp_path / "c.toml").write_text(toml)
    config = load_config(tmp_path / "c.toml")
    assert (config.host.id, config.database.dsn) == (
        "prod",
        "postgresql://numa@db.example:5432/numa",
    )
    assert (config.agents.listen, config.metrics_listen) == ("tcp://0.0.0.0:8465", "0.0.0.0:9000")
    for node, tmpfs in ((0, "29Gi"), (1, "15Gi")):  # a quarter of 118 and of 60 GiB
        spec = _load(tmp_path / f"agent-node{node}.yaml")["spec"]["template"]["spec"]
        [agent] = spec["containers"]
        assert agent["image"] == "registry.local:5000/team/numa-coordinator:0.2.0"
        cmd = agent["command"]
        assert cmd[cmd.index("--connect") + 1] == (
            "tcp://numa-coordinator.nc-prod.svc.cluster.local:8465"
        )
        assert agent["resources"]["limits"]["cpu"] == "4"
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == f"agent-{node}"
        assert vols["tmpfs"]["emptyDir"]["sizeLimit"] == tmpfs
        assert vols["staging"]["hostPath"]["path"] == "/srv/staging"
        assert vols["lake"]["hostPath"]["path"] == "/srv/lake"
    script = (tmp_path / "secrets" / "create.sh").read_text()
    assert "kubectl -n nc-prod create secret generic db-pw --from-file=password\n" in script
    assert "create secret generic agent-1 --from-file=ca.pem" in script
    scrape = _load(tmp_path / "prometheus" / "scrape-config.yaml")["scrape_configs"][0]
    assert scrape["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["nc-prod"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--namespace", "NC_prod"), "--namespace 'NC_prod': a DNS-1123 label"),
        (("--image", "Numa Coordinator"), "--image 'Numa Coordinator': an image reference"),
        (("--host-id", "a b"), "--host-id 'a b': a name of letters"),
        (("--dsn", "mysql://db/numa"), "--dsn 'mysql://db/numa': a postgresql://"),
        (
            ("--dsn", "postgresql://numa:secret@db/numa"),
            "--dsn 'postgresql://numa:***@db/numa': must hold no password",
        ),
        (("--db-secret", "DB_pw"), "--db-secret 'DB_pw': a Secret name"),
        (("--agent-secret", "agent-tls"), "--agent-secret 'agent-tls': must hold {node}"),
        (("--agent-port", "70000"), "--agent-port 70000: a TCP port 1..65535"),
        (("--metrics-port", "7465"), "--metrics-port 7465: must differ from --agent-port"),
        (("--agent-cpus", "0"), "--agent-cpus 0: a whole number of CPUs"),
        (("--tmpfs-fraction", "1.5"), "--tmpfs-fraction 1.5: a fraction of the VM's memory"),
        (("--staging-host-path", "data/staging"), "--staging-host-path 'data/staging': an abs"),
        (("--agent-cpus", "two"), "argument --agent-cpus: invalid int value: 'two'"),
    ],
)
def test_cli_refuses_a_bad_flag_value_naming_it(
    tmp_path: Path, flags: tuple[str, str], message: str
) -> None:
    out = tmp_path / "k8s"
    proc = _plan_cli("--k8s", str(out), *flags)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


def test_cli_k8s_flags_need_k8s_or_the_chain() -> None:
    proc = _plan_cli("--image", "numa-coordinator:0.2.0", "--agent-cpus", "4")
    assert proc.returncode == 2
    assert "--image, --agent-cpus: only with --k8s DIR (or --check-chain)" in proc.stderr
    # the chain checks the manifests these flags make: 31 CPUs do not fit data's 14 allocatable
    proc = _plan_cli("--check-chain", "--agent-cpus", "31")
    assert proc.returncode == 1
    assert "'31' CPUs on k3s-worker-data, but guest NUMA node 0 has 14 allocatable" in proc.stdout


def _secret_mounts(spec: dict[str, Any]) -> dict[str, str]:
    """mountPath -> secretName of a pod spec's Secret volumes."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    [container] = spec["containers"]
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in container["volumeMounts"]
        if m["name"] in secrets
    }


def test_the_secret_layout_holds_every_file_the_pods_read_and_no_value(
    plan: Plan, written: Path, tmp_path: Path
) -> None:
    layout = secret_layout(plan, K8sOptions())
    # every Secret the manifests mount is in the layout, and nothing else
    mounted = {
        s
        for obj in render_manifests(plan).values()
        if obj["kind"] in ("Deployment", "DaemonSet")
        for s in _secret_mounts(obj["spec"]["template"]["spec"]).values()
    }
    assert mounted == set(layout)
    # every file the ConfigMap's config makes a pod read from a Secret mount is a key of it
    (tmp_path / "c.toml").write_text(_load(written / "configmap.yaml")["data"]["coordinator.toml"])
    config = load_config(tmp_path / "c.toml")
    a = config.agents
    pods: list[tuple[str, list[str]]] = [
        (
            "coordinator-deployment.yaml",
            [a.tls_cert, a.tls_key, a.tls_ca, str(config.database.password_file)],
        )
    ]
    for node in (0, 1):
        files = [f.replace("{node}", str(node)) for f in (a.agent_tls_cert, a.agent_tls_key)]
        pods.append((f"agent-node{node}.yaml", [*files, a.tls_ca]))
    for name, files in pods:
        mounts = _secret_mounts(_load(written / name)["spec"]["template"]["spec"])
        for f in files:
            [(mount, secret)] = [(m, s) for m, s in mounts.items() if f.startswith(m + "/")]
            assert f.removeprefix(mount + "/") in layout[secret], (name, f, secret)
    # the script creates exactly these, from files, in the namespace; it holds no secret
    script = (written / "secrets" / "create.sh").read_text()
    made = {}
    for line in script.splitlines():
        if line.startswith("kubectl"):
            words = line.split()
            assert words[:6] == ["kubectl", "-n", "numa-coordinator", "create", "secret", "generic"]
            made[words[6]] = tuple(w.removeprefix("--from-file=") for w in words[7:])
    assert made == layout
    assert "PRIVATE KEY" not in script and "CERTIFICATE" not in script
    assert (written / "secrets" / "create.sh").stat().st_mode & 0o111
    kustomization = _load(written / "kustomization.yaml")
    assert not any(r.startswith(("secrets", "prometheus")) for r in kustomization["resources"])


def test_prometheus_scrapes_both_coordinator_pods_on_their_metrics_port(written: Path) -> None:
    dep = _load(written / "coordinator-deployment.yaml")
    template = dep["spec"]["template"]
    [container] = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # the annotations of the kubernetes-pods convention
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["metrics"]),
        "prometheus.io/path": "/metrics",
    }
    # the static job: this namespace's pods with the Deployment's label, on the port named metrics
    [job] = _load(written / "prometheus" / "scrape-config.yaml")["scrape_configs"]
    # the job name docs/prometheus/alerts.yml's NumaCoordinatorDown counts on
    alerts = (ROOT / "docs" / "prometheus" / "alerts.yml").read_text()
    assert f'up{{job="{job["job_name"]}"}} == 0' in alerts
    assert job["metrics_path"] == "/metrics"
    [sd] = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    assert sd["namespaces"]["names"] == [dep["metadata"]["namespace"]]
    [selector] = sd["selectors"]
    wanted = dict(kv.split("=", 1) for kv in selector["label"].split(","))
    assert wanted.items() <= template["metadata"]["labels"].items()
    assert wanted == dep["spec"]["selector"]["matchLabels"]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep == [
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": "metrics",
            "action": "keep",
        }
    ]
    assert "metrics" in ports


def test_the_kubernetes_validate_command_passes_the_written_files_and_fails_a_bad_one(
    written: Path, tmp_path: Path
) -> None:
    """The check as an operator runs it: `kubernetes-validate --strict -k 1.31.0 FILES`."""
    tool = Path(sys.executable).parent / "kubernetes-validate"
    names = _load(written / "kustomization.yaml")["resources"]

    def validate(*files: Path) -> subprocess.CompletedProcess[str]:
        cmd = [str(tool), "--strict", "-k", K8S_VERSION, *map(str, files)]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)

    proc = validate(*(written / n for n in names))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "agent-node0.yaml"
    bad.write_text(
        (written / "agent-node0.yaml").read_text().replace("nodeSelector:", "nodeSelecter:")
    )
    proc = validate(bad)
    assert proc.returncode != 0
    assert "nodeSelecter" in proc.stdout + proc.stderr
