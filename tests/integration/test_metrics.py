"""Metrics as an SRE sees them: a real Prometheus scrapes every process of the running stack, and the
names the alert rules and the dashboard use are the names the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from quorum.core import metrics
from tests.integration import slices
from tests.integration.servers import REPO, free_port

pytestmark = pytest.mark.integration


def _exported_names() -> set[str]:
    names = set()
    from prometheus_client.metrics import MetricWrapperBase

    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for fam in obj.describe():
                base = fam.name
                names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_rules_and_dashboard_use_only_exported_metric_names():
    exported = _exported_names()
    texts = [
        (REPO / "deploy/prometheus/rules.yml").read_text(),
        *(p.read_text() for p in sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))),
    ]
    used = set()
    for t in texts:
        used |= set(re.findall(r"\bquorum_[a-z_]+\b", t))
    # Recording rules are named quorum:...; raw series must exist in code.
    assert used, "no quorum_ metric referenced?"
    missing = sorted(u for u in used if u not in exported)
    assert not missing, f"rules/dashboard reference metrics the code does not export: {missing}"


def _query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_process(disk_stack, disk_metrics_ports, member_client, data_dir, tmp_path):
    from quorum.core.objectstore import open_store
    from quorum.gallery.enrol import enrol

    exe = shutil.which("prometheus")
    assert exe, "prometheus is not installed: apt-get install -y prometheus"
    rows = slices.rows(data_dir, "metrics")
    enrol(disk_stack, open_store(disk_stack), [(r.identity, r.path) for r in rows])
    client = member_client("metrics-agency")
    rid = client.submit(
        sorted((data_dir / "ci/faces" / rows[0].identity).iterdir())[1],
        case_number="M-1",
        offence_code="PC211",
        purpose="investigation",
    )
    client.wait(rid, timeout=120)

    targets = [f"127.0.0.1:{p}" for p in disk_metrics_ports.values()]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: quorum\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                up = _query(port, "up")
                if len(up) == len(targets) and all(r["value"][1] == "1" for r in up):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not every process is scraped: {up if 'up' in dir() else None}"
            time.sleep(0.5)
        time.sleep(2)
        checks = {
            "sum(quorum_probes_received_total)": 1,
            'sum(quorum_searches_completed_total{outcome="ok"})': 1,
            'sum(quorum_engine_duration_seconds_count{engine="sface",stage="embed"})': 1,
            'sum(quorum_engine_duration_seconds_count{engine="arcface",stage="search"})': 1,
            "count(quorum_gallery_templates)": 3,
            "count(quorum_queue_length)": 1,
            "count(quorum_queue_oldest_message_age_seconds)": 1,
            # the engine workers embed through their micro-batcher (workers.batching)
            'sum(quorum_embed_batch_faces_count{engine="sface"})': 1,
            # every hop's queue wait, from the sent-at header (prepare, search per engine, fuse)
            'sum(quorum_task_queue_wait_seconds_count{task="quorum.intake.prepare"})': 1,
            'sum(quorum_task_queue_wait_seconds_count{task="quorum.engine.search"})': 3,
            'sum(quorum_task_queue_wait_seconds_count{task="quorum.fusion.fuse"})': 1,
        }
        for promql, at_least in checks.items():
            res = _query(port, promql)
            assert res and float(res[0]["value"][1]) >= at_least, (promql, res)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _gauge(port: int, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for fam in text_string_to_metric_families(resp.read().decode()):
            for smp in fam.samples:
                if smp.name == name and smp.labels == labels:
                    return smp.value
    return None


def test_the_oldest_message_age_shows_a_queue_nobody_drains(disk_stack, disk_metrics_ports):
    """A real Celery message on a queue no worker consumes: the gateway reports its age growing (from the
    sent-at header every message carries), and 0 once the queue is empty."""
    import redis as redis_lib

    from quorum.broker.app import TASK_SEARCH, engine_queue, make_app
    from quorum.core.engines import ENGINE_NAMES

    idle = next(e for e in ENGINE_NAMES if e not in disk_stack.engines)  # no worker takes this queue
    queue = engine_queue(idle)
    r = redis_lib.Redis.from_url(disk_stack.redis_url)
    port = disk_metrics_ports["gateway"]
    make_app(disk_stack.redis_url).send_task(
        TASK_SEARCH, kwargs={"request_id": "queue-age-test", "engine": idle}, queue=queue
    )
    try:
        deadline = time.monotonic() + 60
        while (age := _gauge(port, "quorum_queue_oldest_message_age_seconds", queue=queue) or 0.0) < 6:
            assert time.monotonic() < deadline, f"the age of {queue}'s message never reached 6 s (last {age})"
            time.sleep(1)
        assert _gauge(port, "quorum_queue_length", queue=queue) == 1
    finally:
        r.delete(queue)
    deadline = time.monotonic() + 30
    while _gauge(port, "quorum_queue_oldest_message_age_seconds", queue=queue) != 0:
        assert time.monotonic() < deadline, "the age did not go back to 0 once the queue was empty"
        time.sleep(1)
