"""Deployment artefacts: compose file, Prometheus config/rules/tests, Grafana dashboard queries.

Needs `docker-compose` (1.29) and `prometheus`/`promtool` (2.42) on PATH; no Docker engine. A missing
tool FAILS the test with the install command (CI installs them), it never skips. check-jsonschema is
optional: used when installed in the venv (`pip install check-jsonschema`).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "quorum-dashboard.json"

INSTALL_HINT = "install it with: apt-get install -y docker-compose prometheus"
ENTRY_POINTS = {("gateway",)} | {
    ("worker", r) for r in ("intake", "sface", "dlib", "facenet", "arcface", "fusion", "gallery")
}
# Every Celery queue and the worker role that consumes it (the gateway consumes the Redis streams).
QUEUE_ROLES = {
    "intake": "intake",
    "engine.sface": "sface",
    "engine.dlib": "dlib",
    "engine.facenet": "facenet",
    "fusion": "fusion",
    "gallery": "gallery",
}
NON_APP_SERVICES = {"redis", "minio", "postgres", "prometheus"}
# Grafana-only template variables, replaced by values Prometheus accepts.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$agency": ".*"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; {INSTALL_HINT}", pytrace=False)
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------------------------- compose


def test_compose_config_valid_for_docker_compose() -> None:
    run([tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], cwd=ROOT)


def test_compose_matches_compose_spec_schema() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.exists():
        exe_on_path = shutil.which("check-jsonschema")
        if exe_on_path is None:
            pytest.skip("check-jsonschema not installed (optional): pip install check-jsonschema")
        exe = Path(exe_on_path)
    run([str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])


def test_every_app_service_runs_a_quorum_entry_point_and_roles_cover_every_queue() -> None:
    services = compose()["services"]
    app = {name: svc for name, svc in services.items() if name not in NON_APP_SERVICES}
    assert app, "no application services in docker-compose.yml"
    default_roles: set[str] = set()
    for name, svc in app.items():
        assert "build" in svc and svc["build"]["dockerfile"] == "deploy/Dockerfile", (
            f"{name}: not built from deploy/Dockerfile"
        )
        command = tuple(svc.get("command") or ())
        assert command in ENTRY_POINTS, (
            f"{name}: command {command!r} is not a quorum entry point ({sorted(ENTRY_POINTS)})"
        )
        env = svc.get("environment", {})
        assert env.get("QUORUM_METRICS_PORT") == "9100", f"{name}: metrics port must be 9100"
        assert "healthcheck" in svc and "restart" in svc, f"{name}: needs a healthcheck and a restart policy"
        if command[0] == "worker" and not svc.get("profiles"):  # profiles: off unless asked for
            default_roles.add(command[1])
    assert any(tuple(s.get("command") or ()) == ("gateway",) for s in app.values()), "no gateway service"
    missing = {q for q, role in QUEUE_ROLES.items() if role not in default_roles}
    assert not missing, f"queues without a worker in the default profile: {sorted(missing)}"


def test_sface_reserves_a_gpu_and_installs_only_onnxruntime_gpu() -> None:
    sface = compose()["services"]["sface"]
    devices = sface["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert sface["environment"]["QUORUM_DEVICE"] == "gpu"
    assert sface["build"]["args"]["ORT"] == "gpu"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "python:3.11-slim-bookworm" in dockerfile
    assert "pip uninstall -y onnxruntime" in dockerfile and "onnxruntime-gpu==${ORT_GPU_VERSION}" in dockerfile


# ------------------------------------------------------------------------------------- prometheus


def test_promtool_check_config() -> None:
    run([tool("promtool"), "check", "config", str(PROM_DIR / "prometheus.yml")])


def test_promtool_check_rules() -> None:
    run([tool("promtool"), "check", "rules", str(PROM_DIR / "rules.yml")])


def test_promtool_rule_unit_tests_cover_every_alert() -> None:
    run([tool("promtool"), "test", "rules", "rules_test.yml"], cwd=PROM_DIR)
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    tests = yaml.safe_load((PROM_DIR / "rules_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for art in case.get("alert_rule_test", []):
            (firing if art.get("exp_alerts") else quiet).add(art["alertname"])
    assert alerts <= firing, f"alerts never asserted to fire: {sorted(alerts - firing)}"
    assert alerts <= quiet, f"alerts never asserted to stay quiet on healthy input: {sorted(alerts - quiet)}"


def test_every_alert_has_for_severity_and_runbook() -> None:
    for group in yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule.get("for"), f"{rule['alert']}: no `for:`"
                assert rule["labels"]["severity"] in {"page", "warning"}, rule["alert"]
                assert rule["annotations"]["runbook"].startswith("deploy/README.md#"), rule["alert"]
                anchor = rule["annotations"]["runbook"].split("#", 1)[1]
                assert f"### {rule['alert']}" in (ROOT / "deploy" / "README.md").read_text(), (
                    f"README has no runbook section for {anchor}"
                )


# ------------------------------------------------------------------------------------- dashboard


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))  # rows nest panels

    walk(dash["panels"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path: Path):
    exe = tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready:\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_dashboard_queries_evaluate_on_real_prometheus(prometheus: str) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    text = DASHBOARD.read_text()
    for metric in (
        "quorum_probes_received_total",
        "quorum_probes_rejected_total",
        "quorum_searches_completed_total",
        "quorum_search_duration_seconds_bucket",
        "quorum_engine_duration_seconds_bucket",
        "quorum_queue_length",
        "quorum_gallery_templates",
    ):
        assert metric in text, f"dashboard does not chart {metric}"
    failures = []
    for title, expr in exprs:
        query = expr
        for var, value in GRAFANA_VARS.items():
            query = query.replace(var, value)
        leftover = re.findall(r"\$\{?\w+", query)
        assert not leftover, f"{title}: unknown template variable(s) {leftover} in {expr}"
        url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400 carries the parse error
            body = json.load(e)
        if body.get("status") != "success":
            failures.append(f"{title}: {query}\n  -> {body.get('errorType')}: {body.get('error')}")
    assert not failures, "dashboard queries rejected by prometheus:\n" + "\n".join(failures)
