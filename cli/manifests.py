"""Deployment manifests rendered from one layout: Kubernetes (kustomize base and overlays) and the
docker-compose shard services.

A layout is the engine set and each engine's shard count (the settings ``QUORUM_ENGINES`` and
``QUORUM_SHARDS``) and the templates each engine is sized for. From it come one Deployment per role
and per shard (never written by hand per shard), their readiness and liveness probes (``/ready`` and
``/live`` on the metrics port), PodDisruptionBudgets, resource requests from the measured RAM figures
(BENCHMARKS.md "Three engines through the queue": memory per template in a shard process, and each
engine worker's), and
HorizontalPodAutoscalers of the engine and shard pools on the queue length the gateway exports
(``quorum_queue_length``, an External metric through prometheus-adapter, whose rule is rendered too).
The same layout gives ``docker-compose.shards.yml``. :func:`consumed_queues` reads a rendered command
back into the queues it consumes, so a test can check that every queue Quorum sends to has a consumer.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..broker.app import queues_of, role_queue, shard_role

# Memory per template in a shard worker process (the HNSW index, M=32, and its label maps), measured by
# bench/three_engines_e2e.py (BENCHMARKS.md "Three engines through the queue"): 828 MB for 500k 128-d
# templates, 470-482 MB for 125k 512-d ones, less a process's own ~130 MB.
TEMPLATE_BYTES = {128: 1400, 512: 2720}
ENGINE_DIM = {"sface": 128, "dlib": 128, "facenet": 512, "arcface": 512}
# An engine's embed worker (Python, Celery, the runtime and its model), measured in the same run (RSS 637,
# 995 and 370 MB) with a quarter more; dlib's not measured there.
ENGINE_WORKER_MIB = {"sface": 800, "facenet": 1250, "arcface": 500, "dlib": 700}
WORKER_MIB = 700  # any other worker process (measured 100-140 MB: room for bursts of large probe images)
SHARD_BASE_MIB = 150  # a shard worker without its index (it loads no model)
SHARD_HEADROOM = 1.25  # a shard's index grows until the next snapshot; a reload holds two copies briefly
METRICS_PORT = 9100
REVIEW_PORT = 8470
SECRET = "quorum-secrets"  # one Kubernetes Secret, its keys named as the compose secrets (deploy/README.md)
GPU_ENGINES = ("sface", "facenet", "arcface")  # onnxruntime engines: the CUDA provider on a GPU node

# Which Redis user each role connects as (the compose secrets of the same name).
_REDIS_USER = {"gateway": "redis-gateway-url", "review": "redis-review-url"}
_COMMON_SECRETS = ("redis-ca", "database-url", "s3-access-key", "s3-secret-key")


@dataclass(frozen=True)
class Layout:
    engines: tuple[str, ...]
    shards: Mapping[str, int] = field(default_factory=dict)  # engine -> shard count (absent or 1: unsharded)
    templates: int = 13_500_000  # templates per engine the shards are sized for (deploy/README.md capacity plan)
    replicas: int = 2  # of every search-path role and shard: one machine's loss leaves each served

    @classmethod
    def from_settings(cls, s: Any, templates: int | None = None) -> Layout:
        shards = {e: n for e, n in s.shards if e in s.engines and n > 1}
        return cls(tuple(s.engines), shards, templates or cls.templates)

    def shards_of(self, engine: str) -> int:
        return self.shards.get(engine, 1)

    def queues(self) -> set[str]:
        """Every queue a deployment of this layout sends to (``broker.app.queues_of``, less the engines
        it does not run)."""

        class _S:
            engines = self.engines
            shards = tuple(self.shards.items())

        unused = {f"engine.{e}" for e in ENGINE_DIM if e not in self.engines}
        return set(queues_of(_S)) - unused


@dataclass(frozen=True)
class Role:
    """One Deployment (and compose service): what it runs, how many, and how much memory it asks for."""

    name: str  # DNS-1123: sface, sface-shard-2of4, sface-reindex
    command: tuple[str, ...]
    kind: str = "role"  # role | shard | reindex
    redis_secret: str = "redis-worker-url"
    replicas: int = 2
    memory_mib: int = WORKER_MIB
    cpu: str = "500m"
    engine: str | None = None  # an engine's embedding pool (GPU overlay, autoscaled)
    queue: str | None = None  # the queue it is autoscaled on
    extra_secrets: tuple[str, ...] = ()
    port: int | None = None  # served to others (review)


def gallery_mib(layout: Layout, engine: str) -> int:
    """One shard's templates in memory (the whole gallery for an unsharded engine), with headroom."""
    per_shard = layout.templates / layout.shards_of(engine) * TEMPLATE_BYTES[ENGINE_DIM[engine]]
    return int(per_shard * SHARD_HEADROOM / 2**20)


def shard_memory_mib(layout: Layout, engine: str) -> int:
    return gallery_mib(layout, engine) + SHARD_BASE_MIB


def roles(layout: Layout) -> list[Role]:
    """Every Quorum role of the layout, in a stable order."""
    out = [
        Role("gateway", ("quorum", "gateway"), redis_secret="redis-gateway-url", extra_secrets=("secrets-key",)),
        Role("intake", ("quorum", "worker", "intake"), cpu="1"),
    ]
    for e in layout.engines:
        n = layout.shards_of(e)
        # Unsharded, the engine's workers hold its whole gallery; sharded, they embed and scatter only.
        mem = ENGINE_WORKER_MIB[e] + (gallery_mib(layout, e) if n == 1 else 0)
        out.append(Role(e, ("quorum", "worker", e), memory_mib=mem, cpu="1", engine=e, queue=f"engine.{e}"))
    out += [
        Role("fusion", ("quorum", "worker", "fusion")),
        Role("gallery", ("quorum", "worker", "gallery"), replicas=1),
        Role(
            "review",
            ("quorum", "review", "--host", "0.0.0.0", "--port", str(REVIEW_PORT), "--allow-remote"),
            redis_secret="redis-review-url",
            port=REVIEW_PORT,
        ),
    ]
    for e in layout.engines:
        n = layout.shards_of(e)
        for i in range(n if n > 1 else 0):
            queue = role_queue(shard_role(e, i, n))
            cmd = ("quorum", "worker", e, "--shard", f"{i}/{n}")
            mem = shard_memory_mib(layout, e)
            out.append(Role(f"{e}-shard-{i}of{n}", cmd, "shard", memory_mib=mem, queue=queue))
    # Reindex workers run only while `quorum gallery reindex` builds a new version: 0 until scaled up.
    out += [
        Role(
            f"{e}-reindex",
            ("quorum", "worker", e, "--reindex"),
            "reindex",
            replicas=0,
            memory_mib=ENGINE_WORKER_MIB[e],
            cpu="1",
        )
        for e in layout.engines
    ]
    return out


def consumed_queues(command: Sequence[str]) -> set[str]:
    """The queues a rendered Quorum command consumes (``quorum worker ROLE [--shard I/S] [--reindex]``)."""
    args = list(command)
    if args[:2] != ["quorum", "worker"] or len(args) < 3:
        return set()
    role = args[2]
    if "--shard" in args:
        i, n = (int(x) for x in args[args.index("--shard") + 1].split("/"))
        role = shard_role(role, i, n)
    elif "--reindex" in args:
        role = f"{role}.reindex"
    queue = role_queue(role)
    return set(queue.split(",")) if queue else set()


# ---- Kubernetes -----------------------------------------------------------------------------------


def _labels(role: Role) -> dict[str, str]:
    return {"app.kubernetes.io/name": "quorum", "app.kubernetes.io/component": role.name}


def _volume(role: Role) -> dict[str, Any]:
    """The role's own credentials only, at /run/secrets/<name> as in compose (QUORUM_<NAME>_FILE)."""
    items = [{"key": role.redis_secret, "path": "redis-url"}]
    items += [{"key": k, "path": k} for k in (*_COMMON_SECRETS, *role.extra_secrets)]
    return {"name": "secrets", "secret": {"secretName": SECRET, "defaultMode": 0o400, "items": items}}


def _env(role: Role) -> list[dict[str, str]]:
    files = {"REDIS_URL": "redis-url", "DATABASE_URL": "database-url", "S3_ACCESS_KEY": "s3-access-key"}
    files |= {"S3_SECRET_KEY": "s3-secret-key"}
    if "secrets-key" in role.extra_secrets:
        files["SECRETS_KEY"] = "secrets-key"
    return [{"name": f"QUORUM_{k}_FILE", "value": f"/run/secrets/{v}"} for k, v in files.items()]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "metrics"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _container(role: Role) -> dict[str, Any]:
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}]
    if role.port:
        ports.append({"name": "http", "containerPort": role.port})
    return {
        "name": "quorum",
        "image": "quorum-engine" if role.engine in GPU_ENGINES else "quorum",  # the gpu overlay retags it
        "args": list(role.command),
        "envFrom": [{"configMapRef": {"name": "quorum-settings"}}],
        "env": _env(role),
        "ports": ports,
        # Loading a model and a gallery shard takes minutes: the startup probe allows 20 of them.
        "startupProbe": _probe("/live", 10, 120),
        "livenessProbe": _probe("/live", 15, 4),
        "readinessProbe": _probe("/ready", 10, 3),
        "resources": {
            "requests": {"cpu": role.cpu, "memory": f"{role.memory_mib}Mi"},
            "limits": {"memory": f"{int(role.memory_mib * 1.5)}Mi"},
        },
        "volumeMounts": [{"name": "secrets", "mountPath": "/run/secrets", "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 10001},
    }


def deployment(role: Role) -> dict[str, Any]:
    pod: dict[str, Any] = {
        # Celery's warm shutdown lets a worker finish its running task (compose: stop_grace_period 60s).
        "terminationGracePeriodSeconds": 60,
        "containers": [_container(role)],
        "volumes": [_volume(role)],
    }
    if role.replicas > 1:  # spread the replicas over nodes: one node's loss leaves each role served
        pod["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": _labels(role)},
            }
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": role.name, "labels": _labels(role)},
        "spec": {
            "replicas": role.replicas,
            "selector": {"matchLabels": _labels(role)},
            "template": {"metadata": {"labels": _labels(role)}, "spec": pod},
        },
    }


def disruption_budget(role: Role) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": _labels(role)}}
    spec |= {"minAvailable": 1} if role.replicas > 1 else {"maxUnavailable": 1}
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": role.name}, "spec": spec}


def autoscaler(role: Role, per_replica: int = 20) -> dict[str, Any]:
    """Scale a pool on its queue's length: about ``per_replica`` waiting messages per worker."""
    metric = {"name": "quorum_queue_length", "selector": {"matchLabels": {"queue": role.queue or ""}}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": role.name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": role.name},
            "minReplicas": role.replicas,
            "maxReplicas": 4 * role.replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": metric,
                        "target": {"type": "AverageValue", "averageValue": str(per_replica)},
                    },
                }
            ],
            # Up at once on a backlog, down slowly: a shard worker takes minutes to load its gallery.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }


def services(rs: Iterable[Role]) -> list[dict[str, Any]]:
    """A headless Service per role for Prometheus to find every pod's /metrics, and review's own."""
    out = []
    for role in rs:
        ports = [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]
        if role.port:
            ports.append({"name": "http", "port": role.port, "targetPort": "http"})
        spec = {"selector": _labels(role), "ports": ports, "clusterIP": "None"}
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": role.name}, "spec": spec})
    return out


def settings_map(layout: Layout, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    data = {
        "QUORUM_ENGINES": ",".join(layout.engines),
        "QUORUM_SHARDS": ",".join(f"{e}={n}" for e, n in sorted(layout.shards.items())),
        "QUORUM_METRICS_PORT": str(METRICS_PORT),
        "QUORUM_HOME": "/var/lib/quorum",
        "QUORUM_S3_ENDPOINT": "minio:9000",
        "QUORUM_S3_BUCKET": "quorum",
        "QUORUM_DEVICE": "cpu",
        "QUORUM_LOG_JSON": "true",
        **(extra or {}),
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "quorum-settings"}, "data": data}


ADAPTER_RULES = {
    # prometheus-adapter's rule (its ConfigMap's config.yaml) that serves quorum_queue_length as an
    # External metric, one series per queue (the gateways all export it: the highest reading counts).
    "externalRules": [
        {
            "seriesQuery": 'quorum_queue_length{queue!=""}',
            "resources": {"namespaced": False},
            "name": {"as": "quorum_queue_length"},
            "metricsQuery": "max(<<.Series>>{<<.LabelMatchers>>}) by (queue)",
        }
    ]
}


def kubernetes(layout: Layout) -> dict[str, Any]:
    """Path (under deploy/k8s) -> document(s): the base and the cpu and gpu overlays."""
    rs = roles(layout)
    scaled = [r for r in rs if r.queue]
    files: dict[str, Any] = {
        "base/settings.yaml": [settings_map(layout)],
        "base/roles.yaml": [deployment(r) for r in rs if r.kind != "shard"],
        "base/shards.yaml": [deployment(r) for r in rs if r.kind == "shard"],
        "base/services.yaml": services(rs),
        "base/disruption.yaml": [disruption_budget(r) for r in rs if r.replicas],
        "base/autoscaling.yaml": [autoscaler(r) for r in scaled],
        "prometheus-adapter-rules.yaml": [ADAPTER_RULES],
    }
    files["base/kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [p.removeprefix("base/") for p, docs in files.items() if p.startswith("base/") and docs],
            "labels": [{"pairs": {"app.kubernetes.io/part-of": "quorum"}}],
        }
    ]
    files |= _overlays([r for r in rs if r.engine and r.engine in GPU_ENGINES])
    return files


def _overlay(images: list[dict[str, str]], patches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "quorum",
        "resources": ["../../base", "namespace.yaml"],
        "images": images,
    }
    if patches:
        doc["patches"] = patches
    return doc


def _gpu_patch(role: Role) -> dict[str, Any]:
    """An engine pool on GPU nodes: the gpu image, one GPU each, the CUDA provider."""
    container = {
        "name": "quorum",
        "env": [{"name": "QUORUM_DEVICE", "value": "gpu"}, {"name": "QUORUM_EMBED_BATCH", "value": "64"}],
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    }
    spec = {
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
    }
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": role.name}}
    patch["spec"] = {"template": {"spec": spec}}
    return {"target": {"kind": "Deployment", "name": role.name}, "patch": _dump([patch])}


def _overlays(gpu_roles: list[Role]) -> dict[str, Any]:
    namespace = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "quorum"}}]
    image = "registry.example.org/quorum"  # replace with your registry (deploy/README.md)
    cpu = [
        {"name": "quorum", "newName": image, "newTag": "cpu"},
        {"name": "quorum-engine", "newName": image, "newTag": "cpu"},
    ]
    gpu = [
        {"name": "quorum", "newName": image, "newTag": "cpu"},
        {"name": "quorum-engine", "newName": image, "newTag": "gpu"},
    ]
    return {
        "overlays/cpu/namespace.yaml": namespace,
        "overlays/cpu/kustomization.yaml": [_overlay(cpu)],
        "overlays/gpu/namespace.yaml": namespace,
        "overlays/gpu/kustomization.yaml": [_overlay(gpu, [_gpu_patch(r) for r in gpu_roles])],
    }


# ---- docker-compose -------------------------------------------------------------------------------


def compose_shards(layout: Layout, compose: Mapping[str, Any]) -> dict[str, Any]:
    """``docker-compose.shards.yml``, used beside ``docker-compose.yml`` (``compose``, parsed): the layout's
    settings for every application service, and a service per shard (and per engine's reindex workers,
    profile ``reindex``), each a copy of the ``intake`` service (image, settings, credentials, health
    check, dependencies) with its own command. Copied, not ``extends``: docker-compose 1.29 cannot
    extend a service that has ``depends_on``."""
    layout_env = {k: v for k, v in settings_map(layout)["data"].items() if k in ("QUORUM_ENGINES", "QUORUM_SHARDS")}
    services = compose["services"]
    apps = [n for n, svc in services.items() if list(svc.get("command") or [])[:1] == ["quorum"]]
    svcs: dict[str, Any] = {name: {"environment": dict(layout_env)} for name in apps}
    template = {k: v for k, v in services["intake"].items() if k not in ("command", "profiles", "environment")}
    for role in roles(layout):
        if role.kind == "role":
            continue
        svc: dict[str, Any] = {**copy.deepcopy(template), "command": list(role.command)}
        svc["environment"] = {**services["intake"].get("environment", {}), **layout_env}
        if role.kind == "reindex":
            svc["profiles"] = ["reindex"]
        svcs[role.name] = svc
    return {"services": svcs}


MARK = "# Rendered by `quorum deploy render`"
HEADER = (
    MARK
    + """ from the layout {layout}; do not edit by hand:
# change QUORUM_ENGINES / QUORUM_SHARDS and render again (deploy/README.md "Kubernetes").
"""
)


def _dump(docs: list[Any]) -> str:
    import yaml

    class _Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # every value written out where it is used: no &id001 anchors for a reader to chase

    return yaml.dump_all(docs, Dumper=_Plain, sort_keys=False, default_flow_style=False, width=120)


def render(layout: Layout, compose: Mapping[str, Any]) -> dict[str, str]:
    """Relative path -> file text: deploy/k8s/... and, from ``compose`` (docker-compose.yml, parsed),
    docker-compose.shards.yml."""
    shards = ",".join(f"{e}={n}" for e, n in sorted(layout.shards.items())) or "none"
    label = f"engines={','.join(layout.engines)} shards={shards} templates={layout.templates:,}"
    head = HEADER.format(layout=label)
    out = {f"deploy/k8s/{p}": head + _dump(docs) for p, docs in kubernetes(layout).items() if docs}
    out["docker-compose.shards.yml"] = head + _dump([compose_shards(layout, compose)])
    return out


def command_of(doc: Mapping[str, Any]) -> list[str]:
    """The Quorum command of a rendered Deployment or compose service."""
    if doc.get("kind") == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"][0].get("args") or [])
    cmd = doc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def rendered_files(root: Path) -> list[str]:
    """Files under ``root`` that a rendering wrote (they start with its mark), relative to ``root``."""
    found = [*(root / "deploy" / "k8s").rglob("*.yaml"), root / "docker-compose.shards.yml"]
    return sorted(
        str(p.relative_to(root)) for p in found if p.is_file() and p.read_text(errors="replace").startswith(MARK)
    )
