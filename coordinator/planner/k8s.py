"""A checked plan turned into Kubernetes manifests for k3s, and ``coordinatorctl plan --k8s DIR``.

From the same ``Plan`` as ``coordinator.planner.render``: a Namespace, the coordinator's config as
a ConfigMap, the coordinator as a two-replica Deployment (the leader lock keeps one standby) with
a PodDisruptionBudget and a Service, and one staging-agent DaemonSet per NUMA node, selected by
the node label the plan puts on that node's k3s workers, tolerating their taints, in Guaranteed
QoS with integer CPUs (so the static CPU manager pins it) and a memory-backed emptyDir as the
node's tmpfs. Inside its worker VM an agent binds to the guest's one NUMA node, 0, and serves
host node N (``numactl --membind=0 --cpunodebind=0 staging-agent --node N --bind-node 0``).
The coordinator is Ready only as the leader (``/ready``). Secrets (the database password, the
TLS material) are referenced, never generated: ``secrets/create.sh`` names them and their files;
``prometheus/scrape-config.yaml`` is a scrape job for Prometheus. ``check_manifests`` is the
project's own semantic check of them; the CLI runs it before writing. ``K8sOptions`` holds
what the layout does not say (``plan --k8s``'s flags), each value checked. Everything but
``write_k8s`` is pure; see ``docs/layout.md`` "Deploy on k3s".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from coordinator.core.errors import LayoutError
from coordinator.planner.kubelet import (
    KubeletOptions,
    check_host_reserve,
    check_kubelet,
    render_k3s_kubelet_arg,
    render_kubelet_config,
)
from coordinator.planner.plan import GUEST_NODE, Plan

__all__ = [
    "AgentArgs",
    "K8sOptions",
    "agent_args",
    "check_manifests",
    "check_options",
    "render_kubelet_files",
    "render_manifests",
    "render_prometheus",
    "render_secrets_script",
    "secret_layout",
    "to_yaml",
    "write_k8s",
]

_CONFIG_DIR = "/etc/numa-coordinator"
_TLS_DIR = f"{_CONFIG_DIR}/tls"
_DB_DIR = f"{_CONFIG_DIR}/db"
_STAGING = "/data/hot/staging"
_LAKE = "/data/lake"
_TMPFS = "/var/lib/numa-coordinator/tmpfs"
_AGENT_OVERHEAD_GIB = 1  # the agent's own heap beside its tmpfs, inside the same memory limit
_COORDINATOR = {"app.kubernetes.io/name": "coordinatord"}  # the coordinator pods' label


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HOST_ID = re.compile(r"[A-Za-z0-9._-]{1,63}")  # as [host] id (coordinator.core.config)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?:{_COMPONENT}(?:\.{_COMPONENT})*(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def _subdomain(text: str) -> bool:
    return len(text) <= 253 and _DNS_SUBDOMAIN.fullmatch(text) is not None


@dataclass(frozen=True)
class K8sOptions:
    """What the layout does not say about the cluster; each value checked on creation
    (LayoutError naming the field as ``coordinatorctl plan``'s flag, e.g. ``--namespace``)."""

    namespace: str = "numa-coordinator"
    image: str = "numa-coordinator:0.1.0"
    host_id: str = "k3s"
    dsn: str = "postgresql://numa@postgres:5432/numa"
    agent_port: int = 7465
    metrics_port: int = 9465
    tmpfs_fraction: float = 0.125  # of the agent VM's memory (agent_vm)
    agent_cpus: int = 2
    staging_host_path: str = _STAGING
    lake_host_path: str = _LAKE
    # The Secrets the pods mount; their names only (no value is ever generated).
    db_secret: str = "numa-coordinator-db"  # key: password
    tls_secret: str = "numa-coordinator-tls"  # keys: ca.pem, coordinator.pem, coordinator.key
    agent_secret: str = "numa-coordinator-agent-node{node}"  # keys: ca.pem, node-N.pem/.key
    # the models cross-checked on each node: config/coordinator.toml's (edit the ConfigMap)
    models: tuple[tuple[int, tuple[str, ...]], ...] = (
        (0, ("slm-1", "slm-2", "slm-3", "slm-4")),
        (1, ("slm-5", "slm-6", "slm-7")),
    )

    def __post_init__(self) -> None:
        problems = check_options(self)
        if problems:
            raise LayoutError("; ".join(problems))

    def agent_secret_name(self, node: int) -> str:
        return self.agent_secret.replace("{node}", str(node))


def check_options(opts: K8sOptions) -> list[str]:
    """Every value of ``opts`` that Kubernetes, the coordinator or the pods would refuse, each
    named by its ``plan`` flag."""
    problems: list[str] = []

    def bad(flag: str, value: object, expected: str) -> None:
        problems.append(f"{flag} {value!r}: {expected}")

    if not _DNS_LABEL.fullmatch(opts.namespace):
        bad("--namespace", opts.namespace, "a DNS-1123 label (a-z, 0-9, '-', 1..63 characters)")
    if len(opts.image) > 255 or not _IMAGE.fullmatch(opts.image):
        bad("--image", opts.image, "an image reference such as registry:5000/name:tag")
    if not _HOST_ID.fullmatch(opts.host_id):
        bad("--host-id", opts.host_id, "a name of letters, digits, '.', '-' and '_', 1..63")
    dsn = urlsplit(opts.dsn)
    if dsn.scheme not in ("postgresql", "postgres") or not dsn.hostname:
        bad("--dsn", opts.dsn, "a postgresql://USER@HOST:PORT/DB URI")
    elif dsn.password is not None:
        bad(
            "--dsn",
            opts.dsn.replace(f":{dsn.password}@", ":***@"),
            "must hold no password: it goes into the Secret --db-secret (key password)",
        )
    for flag, port in (("--agent-port", opts.agent_port), ("--metrics-port", opts.metrics_port)):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            bad(flag, port, "a TCP port 1..65535")
    if opts.agent_port == opts.metrics_port:
        bad("--metrics-port", opts.metrics_port, "must differ from --agent-port")
    if not 0 < opts.tmpfs_fraction < 1:
        bad("--tmpfs-fraction", opts.tmpfs_fraction, "a fraction of the VM's memory, 0 < f < 1")
    if isinstance(opts.agent_cpus, bool) or not isinstance(opts.agent_cpus, int):
        bad("--agent-cpus", opts.agent_cpus, "a whole number of CPUs, 1 or more")
    elif opts.agent_cpus < 1:
        bad("--agent-cpus", opts.agent_cpus, "a whole number of CPUs, 1 or more")
    for flag, path in (
        ("--staging-host-path", opts.staging_host_path),
        ("--lake-host-path", opts.lake_host_path),
    ):
        if not path.startswith("/") or "\n" in path:
            bad(flag, path, "an absolute path on the workers")
    for flag, name in (("--db-secret", opts.db_secret), ("--tls-secret", opts.tls_secret)):
        if not _subdomain(name):
            bad(flag, name, "a Secret name (a DNS-1123 subdomain: a-z, 0-9, '-', '.')")
    if "{node}" not in opts.agent_secret:
        bad("--agent-secret", opts.agent_secret, "must hold {node}: one Secret per node")
    elif not _subdomain(opts.agent_secret.replace("{node}", "0")):
        bad("--agent-secret", opts.agent_secret, "with {node} replaced, a Secret name")
    return problems


def _numa_label(plan: Plan) -> str:
    if not plan.layout.label_prefix:
        raise LayoutError(
            f"{plan.layout.path}: [k3s]: label_prefix is empty, so the plan emits no "
            "numa-node label for the agents' DaemonSets to select on"
        )
    return f"{plan.layout.label_prefix}numa-node"


def _taint(text: str) -> dict[str, str]:
    """``key=value:Effect`` (or ``key:Effect``) as a toleration that matches it exactly."""
    head, _, effect = text.rpartition(":")
    key, eq, value = head.partition("=")
    tol = {"key": key, "operator": "Equal" if eq else "Exists", "effect": effect}
    if eq:
        tol["value"] = value
    return tol


def _tolerations(taints: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for t in taints:
        tol = _taint(t)
        if tol not in out:
            out.append(tol)
    return out


def _node_vms(plan: Plan, node: int) -> list[Any]:
    return [vm for vm in plan.vms if vm.spec.node == node]


def agent_vm(plan: Plan, node: int) -> Any:
    """The one worker of NUMA node `node` that runs its staging agent: the VM with the most
    memory there (the first such in the layout). One agent per node: the coordinator keeps one
    connection per node, so a second agent for it would push the first off."""
    vms = _node_vms(plan, node)
    return max(vms, key=lambda vm: vm.spec.memory_gib) if vms else None


def worker_labels(plan: Plan, vm: Any) -> set[tuple[str, str]]:
    """The labels the plan gives a worker: the layout's, and <prefix>numa-node and <prefix>vm."""
    prefix = plan.layout.label_prefix
    auto = {(f"{prefix}numa-node", str(vm.spec.node)), (f"{prefix}vm", vm.spec.name)}
    return {*vm.spec.labels, *(auto if prefix else set())}


def _tmpfs_gib(plan: Plan, node: int, opts: K8sOptions) -> int:
    return max(1, int(agent_vm(plan, node).spec.memory_gib * opts.tmpfs_fraction))


def _service_host(opts: K8sOptions) -> str:
    return f"numa-coordinator.{opts.namespace}.svc.cluster.local"


def render_config(plan: Plan, opts: K8sOptions) -> str:
    """The coordinator.toml both the coordinator and the agents read, with the pods' paths."""
    ids = [n.spec.id for n in plan.nodes if _node_vms(plan, n.spec.id)]
    models = {node: list(names) for node, names in opts.models if node in ids}
    nodes = "".join(
        f"\n[[node]]\nid = {node}\nmodels = {json.dumps(models.get(node, []))}\nremote = true\n"
        f'staging = "{_STAGING}"\ntmpfs = "{_TMPFS}"\nlake = "{_LAKE}"\n'
        for node in ids
    )
    every = [m for node in ids for m in models.get(node, [])]
    return (
        f"# Generated by coordinatorctl plan --k8s from {plan.layout.path}; see docs/layout.md.\n"
        "# Each node's models are config/coordinator.toml's; edit them and [batch] together.\n"
        f"[host]\nid = {json.dumps(opts.host_id)}  # both replicas: one leader lock\n\n"
        f"[batch]\nmodels = {json.dumps(every)}\n\n"
        f'[paths]\nstaging = "{_STAGING}"\nlake = "{_LAKE}"\n'
        f'node_tmpfs = "{_TMPFS}/node{{node}}"\n'
        'state_dir = "/var/lib/numa-coordinator"\nruntime_dir = "/run/numa-coordinator"\n\n'
        f"[database]\ndsn = {json.dumps(opts.dsn)}\n"
        f'password_file = "{_DB_DIR}/password"\n\n'
        "[barrier]\n# agents write into staging from other kernels; inotify hears nothing\n"
        'backend = "poll"\n\n'
        f'[agents]\nlisten = "tcp://0.0.0.0:{opts.agent_port}"\n'
        f'tls_cert = "{_TLS_DIR}/coordinator.pem"\ntls_key = "{_TLS_DIR}/coordinator.key"\n'
        f'tls_ca = "{_TLS_DIR}/ca.pem"\n'
        f'agent_tls_cert = "{_TLS_DIR}/node-{{node}}.pem"\n'
        f'agent_tls_key = "{_TLS_DIR}/node-{{node}}.key"\n\n'
        f'[metrics]\nlisten = "0.0.0.0:{opts.metrics_port}"\n'
        f"{nodes}"
    )


def _meta(name: str, opts: K8sOptions, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": opts.namespace,
        "labels": {"app.kubernetes.io/part-of": "numa-coordinator", **labels},
    }


def _volume_mounts(*mounts: tuple[str, str, bool]) -> list[dict[str, Any]]:
    return [{"name": n, "mountPath": p, "readOnly": ro} for n, p, ro in mounts]


def _shared_volumes(opts: K8sOptions) -> list[dict[str, Any]]:
    return [
        {"name": "config", "configMap": {"name": "numa-coordinator-config"}},
        {
            "name": "staging",
            "hostPath": {"path": opts.staging_host_path, "type": "Directory"},
        },
        {"name": "lake", "hostPath": {"path": opts.lake_host_path, "type": "Directory"}},
    ]


def _coordinator(plan: Plan, opts: K8sOptions, taints: list[str]) -> list[dict[str, Any]]:
    select = dict(_COORDINATOR)
    # Ready only on the leader (/ready answers 503 on the standby), so the Service sends
    # agents to the one replica that serves them; alive on both (/live), so the kubelet never
    # restarts the standby for waiting.
    readiness = {
        "httpGet": {"path": "/ready", "port": "metrics"},
        "periodSeconds": 5,
        "failureThreshold": 2,
    }
    liveness = {
        "httpGet": {"path": "/live", "port": "metrics"},
        "periodSeconds": 10,
        "failureThreshold": 6,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("numa-coordinator", opts, **select),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": select},
            "template": {
                "metadata": {
                    "labels": select,
                    # The scrape convention of Prometheus' kubernetes-pods job (and of the
                    # prometheus-community chart); prometheus/scrape-config.yaml is the same
                    # as a job of its own.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(opts.metrics_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": _numa_label(plan), "operator": "Exists"}
                                        ]
                                    }
                                ]
                            }
                        },
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "labelSelector": {"matchLabels": select},
                                        "topologyKey": "kubernetes.io/hostname",
                                    },
                                }
                            ]
                        },
                    },
                    "tolerations": _tolerations(taints),
                    "containers": [
                        {
                            "name": "coordinatord",
                            "image": opts.image,
                            "command": [
                                "coordinatord",
                                "--config",
                                f"{_CONFIG_DIR}/coordinator.toml",
                            ],
                            "ports": [
                                {"name": "agents", "containerPort": opts.agent_port},
                                {"name": "metrics", "containerPort": opts.metrics_port},
                            ],
                            "readinessProbe": readiness,
                            "livenessProbe": liveness,
                            "volumeMounts": _volume_mounts(
                                ("config", _CONFIG_DIR + "/coordinator.toml", True),
                                ("tls", _TLS_DIR, True),
                                ("db", _DB_DIR, True),
                                ("staging", _STAGING, False),
                                ("lake", _LAKE, False),
                            ),
                        }
                    ],
                    "volumes": [
                        *_shared_volumes(opts),
                        {
                            "name": "tls",
                            "secret": {"secretName": opts.tls_secret, "defaultMode": 0o400},
                        },
                        {
                            "name": "db",
                            "secret": {"secretName": opts.db_secret, "defaultMode": 0o400},
                        },
                    ],
                },
            },
        },
    }
    # subPath: the ConfigMap's one key lands as a file beside the secrets' folders
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]  # type: ignore[index]
    mounts[0]["subPath"] = "coordinator.toml"
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta("numa-coordinator", opts, **select),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": select}},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta("numa-coordinator", opts, **select),
        "spec": {
            "selector": select,
            "ports": [
                {"name": "agents", "port": opts.agent_port, "targetPort": "agents"},
                {"name": "metrics", "port": opts.metrics_port, "targetPort": "metrics"},
            ],
        },
    }
    return [deployment, pdb, service]


def _agent(plan: Plan, opts: K8sOptions, node: int) -> dict[str, Any]:
    name = f"staging-agent-node{node}"
    select = {"app.kubernetes.io/name": "staging-agent", "numa-coordinator/node": str(node)}
    tmpfs = _tmpfs_gib(plan, node, opts)
    resources = {"cpu": str(opts.agent_cpus), "memory": f"{tmpfs + _AGENT_OVERHEAD_GIB}Gi"}
    # The agent runs inside its worker VM, whose guest has one NUMA node, 0 (the host node
    # `node` the VM sits on): it binds to guest node 0 and serves, as node-<node>, host node node.
    command = [
        "numactl",
        f"--membind={GUEST_NODE}",
        f"--cpunodebind={GUEST_NODE}",
        "staging-agent",
        "--node",
        str(node),
        "--bind-node",
        str(GUEST_NODE),
        "--config",
        f"{_CONFIG_DIR}/coordinator.toml",
        "--connect",
        f"tcp://{_service_host(opts)}:{opts.agent_port}",
    ]
    mounts = _volume_mounts(
        ("config", _CONFIG_DIR + "/coordinator.toml", True),
        ("tls", _TLS_DIR, True),
        ("staging", _STAGING, False),
        ("lake", _LAKE, False),
        ("tmpfs", _TMPFS, False),
    )
    mounts[0]["subPath"] = "coordinator.toml"
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(name, opts, **select),
        "spec": {
            "selector": {"matchLabels": select},
            "template": {
                "metadata": {"labels": select},
                "spec": {
                    # On the node's one agent worker (agent_vm), by its numa-node and vm labels.
                    "nodeSelector": {
                        _numa_label(plan): str(node),
                        f"{plan.layout.label_prefix}vm": agent_vm(plan, node).spec.name,
                    },
                    "tolerations": _tolerations([agent_vm(plan, node).spec.taint]),
                    "containers": [
                        {
                            "name": "staging-agent",
                            "image": opts.image,
                            "command": command,
                            "resources": {"requests": resources, "limits": dict(resources)},
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": [
                        *_shared_volumes(opts),
                        {
                            "name": "tls",
                            "secret": {
                                "secretName": opts.agent_secret_name(node),
                                "defaultMode": 0o400,
                            },
                        },
                        {
                            "name": "tmpfs",
                            "emptyDir": {"medium": "Memory", "sizeLimit": f"{tmpfs}Gi"},
                        },
                    ],
                },
            },
        },
    }


def render_manifests(plan: Plan, opts: K8sOptions | None = None) -> dict[str, dict[str, Any]]:
    """Every manifest (file name -> object), in the order kustomization.yaml lists them."""
    opts = opts or K8sOptions()
    taints = [vm.spec.taint for vm in plan.vms]
    out: dict[str, dict[str, Any]] = {
        "namespace.yaml": {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": opts.namespace},
        },
        "configmap.yaml": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("numa-coordinator-config", opts),
            "data": {"coordinator.toml": render_config(plan, opts)},
        },
    }
    deployment, pdb, service = _coordinator(plan, opts, taints)
    out["coordinator-deployment.yaml"] = deployment
    out["coordinator-pdb.yaml"] = pdb
    out["coordinator-service.yaml"] = service
    for n in plan.nodes:
        if _node_vms(plan, n.spec.id):
            out[f"agent-node{n.spec.id}.yaml"] = _agent(plan, opts, n.spec.id)
    return out


def render_prometheus(opts: K8sOptions) -> dict[str, Any]:
    """A Prometheus ``scrape_configs`` job for both coordinator replicas (no ServiceMonitor, no
    operator): pods of the namespace with the coordinator's label, on their ``metrics`` port.
    Both replicas are scraped; the standby's series say ``daemon_state{state="standby"}``."""
    label = ",".join(f"{k}={v}" for k, v in _COORDINATOR.items())
    return {
        "scrape_configs": [
            {
                "job_name": "numa-coordinator",
                "metrics_path": "/metrics",
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "namespaces": {"names": [opts.namespace]},
                        "selectors": [{"role": "pod", "label": label}],
                    }
                ],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": "metrics",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ]
    }


def secret_layout(plan: Plan, opts: K8sOptions) -> dict[str, tuple[str, ...]]:
    """Secret name -> the keys (file names) the pods read from it: the coordinator's TLS files
    and the database password as the ConfigMap names them, and each node's agent's TLS files.
    Names only: no value is ever generated."""
    nodes = [n.spec.id for n in plan.nodes if _node_vms(plan, n.spec.id)]
    out: dict[str, tuple[str, ...]] = {
        opts.tls_secret: ("ca.pem", "coordinator.pem", "coordinator.key"),
        opts.db_secret: ("password",),
    }
    for node in nodes:
        out[opts.agent_secret_name(node)] = ("ca.pem", f"node-{node}.pem", f"node-{node}.key")
    return out


def render_secrets_script(plan: Plan, opts: K8sOptions) -> str:
    """``secrets/create.sh``: the kubectl commands that create every Secret the manifests mount,
    from files of those names in the current folder; it holds no secret value."""
    lines = [
        "#!/bin/sh",
        f"# The Secrets the manifests mount (generated by coordinatorctl plan --k8s from "
        f"{plan.layout.path}).",
        "# Run in a folder holding the files named below (docs/operations.md, 'Agents in VMs',",
        "# makes them); nothing here is a secret. See docs/layout.md, 'Deploy on k3s'.",
        "set -eu",
    ]
    for name, keys in secret_layout(plan, opts).items():
        files = " ".join(f"--from-file={k}" for k in keys)
        lines.append(f"kubectl -n {opts.namespace} create secret generic {name} {files}")
    return "\n".join(lines) + "\n"


def _kustomization(names: list[str], opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": opts.namespace,
        "resources": names,
    }


_QUANTITY = re.compile(r"^(\d+)(Gi)?$")


def _gib(quantity: object) -> int | None:
    m = _QUANTITY.match(str(quantity))
    if m is None or m.group(2) is None:
        return None
    return int(m.group(1))


@dataclass(frozen=True)
class AgentArgs:
    """What an agent container's command says about its node and its binding."""

    membind: int | None  # numactl --membind=G, as the guest numbers its nodes
    cpunodebind: int | None  # numactl --cpunodebind=G
    node: int | None  # staging-agent --node N: the host node it serves (its certificate's)
    bind_node: int | None  # staging-agent --bind-node G (default: --node)


def _flag(cmd: list[str], name: str) -> int | None:
    """``--name=V`` or ``--name V`` as an int; None when absent or not a number."""
    for i, arg in enumerate(cmd):
        text = None
        if arg.startswith(f"{name}="):
            text = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(cmd):
            text = cmd[i + 1]
        if text is not None:
            return int(text) if text.isdigit() else None
    return None


def agent_args(cmd: list[str]) -> AgentArgs:
    """The numactl binding and the agent's --node/--bind-node of a container command."""
    numactl = cmd[: cmd.index("staging-agent")] if "staging-agent" in cmd else cmd
    agent = cmd[len(numactl) :]
    node = _flag(agent, "--node")
    bind = _flag(agent, "--bind-node") if "--bind-node" in agent else node
    return AgentArgs(_flag(numactl, "--membind"), _flag(numactl, "--cpunodebind"), node, bind)


def check_agent_command(vm: Any, cmd: list[str], where: str) -> list[str]:
    """An agent container's command against its worker: numactl binds one node of the worker's
    guest, the one the agent's --bind-node names, and --node is the host node the VM sits on."""
    problems: list[str] = []
    a = agent_args(cmd)
    cells = vm.guest_cells
    have = ", ".join(str(c) for c in sorted(cells))
    if cmd[:1] != ["numactl"] or "staging-agent" not in cmd:
        return [f"{where}: command {cmd} is not numactl ... staging-agent ..."]
    for flag, value in (("--membind", a.membind), ("--cpunodebind", a.cpunodebind)):
        if value not in cells:
            problems.append(
                f"{where}: numactl {flag}={value if value is not None else '?'} is no NUMA node "
                f"of vm {vm.spec.name!r}'s guest (it has node {have})"
            )
    if a.membind != a.bind_node or a.cpunodebind != a.bind_node:
        problems.append(
            f"{where}: numactl binds node {a.membind}/{a.cpunodebind} but the agent checks its "
            f"binding against node {a.bind_node} (--bind-node, else --node): it would refuse "
            "to run"
        )
    if a.node != vm.spec.node:
        problems.append(
            f"{where}: command {cmd} does not serve --node {vm.spec.node}, the host NUMA node "
            f"vm {vm.spec.name!r} sits on"
        )
    return problems


def check_manifests(plan: Plan, manifests: dict[str, dict[str, Any]]) -> list[str]:
    """What in the DaemonSets contradicts the plan; empty when they agree."""
    problems: list[str] = []
    for name, obj in manifests.items():
        if obj.get("kind") != "DaemonSet":
            continue
        spec = obj["spec"]["template"]["spec"]
        where = f"{name}: DaemonSet {obj['metadata']['name']}"
        selector = set((spec.get("nodeSelector") or {}).items())
        workers = [vm for vm in plan.vms if selector and selector <= worker_labels(plan, vm)]
        if len(workers) != 1:
            found = ", ".join(vm.spec.k3s_node for vm in workers) or "none"
            problems.append(
                f"{where}: nodeSelector {dict(sorted(selector))} must match exactly one worker "
                f"by the labels the plan emits (one agent per NUMA node); it matches {found}"
            )
            continue
        vm = workers[0]
        tolerations = spec.get("tolerations") or []
        if _taint(vm.spec.taint) not in tolerations:
            problems.append(
                f"{where}: no toleration for taint {vm.spec.taint!r} of {vm.spec.k3s_node}"
            )
        containers = spec.get("containers") or []
        for c in containers:
            cmd = [str(a) for a in c.get("command") or []]
            problems += check_agent_command(vm, cmd, where)
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            if req != lim:
                problems.append(f"{where}: requests {req} != limits {lim} (not Guaranteed QoS)")
            if not re.fullmatch(r"[1-9]\d*", str(lim.get("cpu", ""))):
                problems.append(
                    f"{where}: cpu limit {lim.get('cpu')!r} is not an integer; the static CPU "
                    "manager pins only integer CPUs"
                )
        budget = vm.spec.memory_gib
        for vol in spec.get("volumes") or []:
            empty = vol.get("emptyDir")
            if empty is None:
                continue
            size = _gib(empty.get("sizeLimit"))
            limit = (
                _gib(((containers[0].get("resources") or {}).get("limits") or {}).get("memory"))
                if containers
                else None
            )
            if empty.get("medium") != "Memory" or size is None:
                problems.append(
                    f"{where}: emptyDir {vol.get('name')} must be medium Memory with a "
                    "sizeLimit in Gi"
                )
            elif size > budget:
                problems.append(
                    f"{where}: emptyDir {vol.get('name')} of {size}Gi exceeds the memory of "
                    f"{vm.spec.k3s_node} ({budget} GiB)"
                )
            elif limit is None or size > limit or limit > budget:
                problems.append(
                    f"{where}: memory limit {limit}Gi must hold the {size}Gi tmpfs and fit "
                    f"{vm.spec.k3s_node} ({budget} GiB)"
                )
    return problems


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def _emit(value: object, indent: str) -> list[str]:
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            key = _scalar(str(k)) if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", str(k)) else k
            lines += _entry(f"{indent}{key}:", v, indent + "  ")
    elif isinstance(value, list):
        for item in value:
            sub = _emit(item, indent + "  ") if isinstance(item, dict | list) and item else None
            if sub:
                lines.append(f"{indent}- {sub[0].lstrip()}")
                lines += sub[1:]
            else:
                lines.append(f"{indent}- {_inline(item)}")
    return lines


def _inline(value: object) -> str:
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    return _scalar(value)


def _entry(head: str, value: object, indent: str) -> list[str]:
    if isinstance(value, str) and "\n" in value:
        body = value.rstrip("\n").split("\n")
        return [f"{head} |", *(f"{indent}{line}" if line else "" for line in body)]
    if isinstance(value, dict | list) and value:
        return [head, *_emit(value, indent)]
    return [f"{head} {_inline(value)}"]


def to_yaml(obj: dict[str, Any], comment: str = "") -> str:
    """Block-style YAML of a manifest; strings JSON-quoted, multi-line ones as literal blocks."""
    head = f"# {comment}\n" if comment else ""
    return head + "\n".join(_emit(obj, "")) + "\n"


def agent_cpus_by_worker(plan: Plan, manifests: dict[str, dict[str, Any]]) -> dict[str, int]:
    """k3s node -> the integer CPUs its agent DaemonSet's container asks for (by its selector)."""
    out: dict[str, int] = {}
    for obj in manifests.values():
        if obj.get("kind") != "DaemonSet":
            continue
        spec = obj["spec"]["template"]["spec"]
        selector = set((spec.get("nodeSelector") or {}).items())
        cpus = sum(
            int(str(((c.get("resources") or {}).get("limits") or {}).get("cpu", "0")) or 0)
            for c in spec.get("containers") or []
        )
        for vm in plan.vms:
            if selector and selector <= worker_labels(plan, vm):
                out[vm.spec.k3s_node] = out.get(vm.spec.k3s_node, 0) + cpus
    return out


def render_kubelet_files(
    plan: Plan, opts: K8sOptions | None = None, kubelet: KubeletOptions | None = None
) -> dict[str, str]:
    """kubelet/<k3s_node>.yaml (a KubeletConfiguration) and kubelet/<k3s_node>.k3s.yaml (the k3s
    config drop-in that applies it) for every worker, checked against the plan and the agents'
    DaemonSets; LayoutError lists what contradicts."""
    opts = opts or K8sOptions()
    configs = {vm.spec.k3s_node: render_kubelet_config(vm, kubelet) for vm in plan.vms}
    wanted = agent_cpus_by_worker(plan, render_manifests(plan, opts))
    problems = check_host_reserve(plan) + check_kubelet(plan, configs, wanted)
    if problems:
        raise LayoutError("generated kubelet configs contradict the plan: " + "; ".join(problems))
    files: dict[str, str] = {}
    for vm in plan.vms:
        node = vm.spec.k3s_node
        comment = (
            f"{node}: vm {vm.spec.name} on NUMA node {vm.spec.node}, generated by coordinatorctl "
            f"plan --k8s from {plan.layout.path}; install as /etc/rancher/k3s/kubelet.yaml"
        )
        files[f"kubelet/{node}.yaml"] = to_yaml(configs[node], comment)
        files[f"kubelet/{node}.k3s.yaml"] = render_k3s_kubelet_arg(vm)
    return files


def write_k8s(plan: Plan, out: str | Path, opts: K8sOptions | None = None) -> list[Path]:
    """Check and write the manifests and their kustomization.yaml under ``out``."""
    opts = opts or K8sOptions()
    manifests = render_manifests(plan, opts)
    problems = check_manifests(plan, manifests)
    if problems:
        raise LayoutError("generated manifests contradict the plan: " + "; ".join(problems))
    out = Path(out)
    comment = f"Generated by coordinatorctl plan --k8s from {plan.layout.path}; see docs/layout.md."
    files = {name: to_yaml(obj, comment) for name, obj in manifests.items()}
    files["kustomization.yaml"] = to_yaml(_kustomization(list(manifests), opts), comment)
    files.update(render_kubelet_files(plan, opts))
    # Not Kubernetes objects (kustomization.yaml does not list them): Prometheus' side, and the
    # Secrets to create by hand.
    files["prometheus/scrape-config.yaml"] = to_yaml(
        render_prometheus(opts),
        f"{comment} Merge into prometheus.yml; or rely on the pods' prometheus.io annotations.",
    )
    files["secrets/create.sh"] = render_secrets_script(plan, opts)
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
            written.append(out / name)
        (out / "secrets/create.sh").chmod(0o755)
    except OSError as exc:
        raise LayoutError(f"cannot write manifests under {out}: {exc}") from exc
    return written
