"""The agency clients outside the server's Python (issue 8), each against the real disk stack, logged in
as the agency's own Redis ACL user (loaded with `quorum registry redis-acl --apply`, as the README says
for the local stack):

- the shell client (clients/shell/quorum-submit.sh: redis-cli, openssl, jq, base64, ajv-cli),
- the Node.js client (clients/node: ioredis, ajv, canonicalize),
- the light Python package (clients/python: quorum-client), installed into a throwaway target folder
  and checked not to import any of the server's packages.

Each gets a candidate list for a ci probe and for an image over 200 KB, a refusal with its code, and
refuses a request that breaks the published schema before sending (nothing reaches the intake stream).
The same payloads with floats and non-ASCII text are signed alike by the server, Node, the light Python
client and (for the subset it supports: strings and integers) the shell client.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from PIL import Image

from quorum.accountability import db, registry
from quorum.broker import keys, signing
from quorum.cli.stack import settings_env
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from tests.integration import slices

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHELL = REPO / "clients" / "shell" / "quorum-submit.sh"
NODE_DIR = REPO / "clients" / "node"
AGENCY, USER = "clients-ag", "clients-inv"
VECTORS = json.loads((REPO / "clients" / "vectors.json").read_text())
CLIENTS = ("shell", "node", "python")


def _require_tools() -> None:
    """No skips: a missing tool fails, naming what installs it (scripts/setup.sh does)."""
    missing = [t for t in ("node", "redis-cli", "jq", "openssl", "base64") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/setup.sh (apt: nodejs, redis-tools, jq, openssl)")
    modules = NODE_DIR / "node_modules"
    if not (modules / "ioredis").is_dir() or not (modules / ".bin" / "ajv").exists():
        pytest.fail("the Node client's dependencies are missing: run 'npm ci' in clients/node (scripts/setup.sh does)")


@pytest.fixture(scope="module")
def world(disk_stack, data_dir, tmp_path_factory):
    from quorum.evaluation.ci_split import read_split

    _require_tools()
    s = disk_stack
    tmp = tmp_path_factory.mktemp("clients")
    rows = read_split(data_dir / "ci")
    gallery = slices.rows(data_dir, "clients")
    report = enrol(s, open_store(s), [(r.identity, r.path) for r in gallery])
    assert all(n == len(gallery) for n in report.enrolled.values()), report
    known = {r.identity for r in gallery}
    probes = [r for r in rows if r.role == "probe" and r.identity in known]
    assert len(probes) >= 2

    eng = db.get_engine(s)
    creds = registry.add_agency(eng, AGENCY, "Clients test agency", actor="test-op")
    registry.provision(eng, AGENCY, users={USER: "investigator"}, offences=("PC211",))
    # The local stack's Redis runs without an ACL file: the README's command loads the agency users.
    out = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "registry", "redis-acl", "--apply"],
        env=settings_env(s),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and f"agency-{AGENCY}" in out.stdout, out.stdout + out.stderr

    # The light Python client, installed on its own (its dependencies: redis, rfc8785, jsonschema).
    target = tmp / "pyclient"
    light = str(REPO / "clients" / "python")
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), light],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr

    # A probe over 200 KB: a ci probe upscaled and saved as PNG.
    big_row = probes[1]
    img = Image.open(big_row.path).convert("RGB")
    img = img.resize((img.width * 3, img.height * 3), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    big = tmp / "big-probe.png"
    big.write_bytes(buf.getvalue())
    assert big.stat().st_size > 200_000

    host, port = s.redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QUORUM_") and k != "REDISCLI_AUTH"},
        "QUORUM_AGENCY_SECRET": creds.secret,
        # the shell client: redis-cli reads the password from REDISCLI_AUTH
        "QUORUM_REDIS_HOST": host,
        "QUORUM_REDIS_PORT": port,
        "QUORUM_REDIS_USER": creds.redis_user,
        "REDISCLI_AUTH": creds.redis_password,
        # the Node and Python clients
        "QUORUM_REDIS_URL": f"redis://{creds.redis_user}:{creds.redis_password}@{host}:{port}/0",
        "PYTHONPATH": str(target),
    }
    admin = redis.Redis.from_url(s.redis_url)
    return {"s": s, "env": env, "probes": probes, "big": (big_row.identity, big), "admin": admin, "tmp": tmp}


def _command(client: str, *args: str) -> list[str]:
    if client == "shell":
        return ["bash", str(SHELL), *args]
    if client == "node":
        return ["node", str(NODE_DIR / "quorum-submit.mjs"), *args]
    # -P: not the working directory on sys.path; the check below proves no server package is loaded
    code = (
        "import sys; sys.argv = ['quorum-client'] + sys.argv[1:];"
        "import quorum_client.cli as c; rc = c.main();"
        "server = {'broker', 'core', 'schemas', 'accountability', 'workers', 'cli', 'evaluation'} & set(sys.modules);"
        "assert not server, f'the light client imported {server}'; sys.exit(rc)"
    )
    return [sys.executable, "-P", "-c", code, *args]


def _run(world, client: str, *args: str, env: dict | None = None, stdin: str | None = None):
    return subprocess.run(
        _command(client, *args),
        env={**world["env"], **(env or {})},
        cwd=str(world["tmp"]),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _submit(world, client, image, *extra):
    return _run(
        world,
        client,
        "submit",
        str(image),
        "--agency",
        AGENCY,
        "--user",
        USER,
        "--case",
        "2026-CLI-0001",
        "--offence",
        "PC211",
        "--purpose",
        "criminal-investigation",
        "--candidates",
        "20",
        *extra,
    )


def _intake_len(world) -> int:
    return int(world["admin"].xlen(keys.intake_stream(AGENCY)))


@pytest.mark.parametrize("client", CLIENTS)
def test_candidate_lists_including_an_image_over_200_kb(world, client):
    probe = world["probes"][0]
    for identity, image in [(probe.identity, probe.path), world["big"]]:
        out = _submit(world, client, image)
        assert out.returncode == 0, f"{client}: rc {out.returncode}\n{out.stderr[-3000:]}"
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["type"] == "candidate_list" and result["agency_id"] == AGENCY
        subjects = [c["subject_id"] for c in result["candidates"]]
        assert 0 < len(subjects) <= 20
        assert identity in subjects[:3], f"{client}: {identity} not near the top of {subjects[:5]}"
        assert "answered" in out.stderr  # the client's structured log line


@pytest.mark.parametrize("client", CLIENTS)
def test_refusal_comes_back_with_its_code(world, client):
    out = _submit(world, client, world["probes"][0].path, "--purpose", "live-scanning")
    assert out.returncode == 2, f"{client}: rc {out.returncode}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["type"] == "error" and result["code"] == "PURPOSE_NOT_ALLOWED"
    assert "PURPOSE_NOT_ALLOWED" in out.stderr


@pytest.mark.parametrize("client", CLIENTS)
def test_a_refusal_answered_on_the_stream_only_is_found(world, client):
    """BAD_SIGNATURE is decided before the request id can be trusted: no result key, only an error on the
    results stream naming the intake entry, which each client must match."""
    out = _run(
        world,
        client,
        "submit",
        str(world["probes"][0].path),
        "--agency",
        AGENCY,
        "--user",
        USER,
        "--case",
        "2026-CLI-0003",
        "--offence",
        "PC211",
        "--purpose",
        "criminal-investigation",
        env={"QUORUM_AGENCY_SECRET": "not-the-agency-secret"},
    )
    assert out.returncode == 2, f"{client}: rc {out.returncode}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == "BAD_SIGNATURE" and result["stream_entry_id"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    "breakage",
    [("--candidates", "0"), ("--request-id", "not a valid id!"), ("--case", "")],
    ids=["candidates-0", "bad-request-id", "empty-case"],
)
def test_a_request_breaking_the_schema_is_refused_before_sending(world, client, breakage):
    before = _intake_len(world)
    out = _submit(world, client, world["probes"][0].path, *breakage)
    assert out.returncode == 3, f"{client}: rc {out.returncode}\n{out.stderr[-3000:]}"
    assert "schema" in out.stderr
    assert _intake_len(world) == before  # nothing was sent


def test_shell_client_refuses_to_go_on_after_a_failed_login(world):
    """redis-cli carries on as the default user when AUTH fails: the shell client must not."""
    before = _intake_len(world)
    out = _run(
        world,
        "shell",
        "submit",
        str(world["probes"][0].path),
        "--agency",
        AGENCY,
        "--user",
        USER,
        "--case",
        "2026-CLI-0002",
        "--offence",
        "PC211",
        "--purpose",
        "criminal-investigation",
        env={"REDISCLI_AUTH": "not-the-password"},
    )
    assert out.returncode == 1 and "refused the login" in out.stderr, out.stderr
    assert _intake_len(world) == before


FLOATS_AND_TEXT = json.dumps(
    {
        "scores": [0.1, 1e21, -0.0, 5e-7, 1.0, 2.5e-324, 123456789.123],
        "name": "é 中文 😀 Ærøskøbing",
        "\ufb33": "dalet",
        "😀": "emoji key",
        "nested": {"b": [1, 2, {"ü": 0.30000000000000004}], "a": None, "t": True},
        "image": {"data_b64": "aGVsbG8gd29ybGQ="},
    },
    ensure_ascii=False,
)
STRINGS_AND_INTEGERS = json.dumps(
    {"case_number": "Ç-2026/中文-😀", "note": 'line\nbreak \\ "q" \u0001', "n": -7, "m": 9007199254740991},
    ensure_ascii=False,
)


@pytest.mark.parametrize(
    "payload, shell_supported",
    [(v["payload"], v["shell"]) for v in VECTORS["vectors"]] + [(FLOATS_AND_TEXT, False), (STRINGS_AND_INTEGERS, True)],
    ids=[v["name"] for v in VECTORS["vectors"]] + ["floats and non-ASCII", "strings and integers"],
)
def test_the_same_payload_is_signed_alike_in_every_language(world, payload, shell_supported):
    ts, nonce, secret = 1795461293, "crossLanguageNonce_42", "a-secret-with-ünïcode"
    server = signing.sign(secret, payload, timestamp=ts, nonce=nonce)["signature"]
    env = {"QUORUM_AGENCY_SECRET": secret, "QUORUM_TIMESTAMP": str(ts), "QUORUM_NONCE": nonce}
    got = {}
    for client in CLIENTS:
        out = _run(world, client, "sign", env=env, stdin=payload)
        if client == "shell" and not shell_supported:
            assert out.returncode == 3 and "JCS library" in out.stderr, out.stderr  # said, not signed wrongly
            continue
        assert out.returncode == 0, f"{client}: {out.stderr[-2000:]}"
        fields = json.loads(out.stdout)
        assert fields["payload"] == payload and fields["timestamp"] == str(ts) and fields["nonce"] == nonce
        got[client] = fields["signature"]
    assert got == dict.fromkeys(got, server)
    # and the gateway's check accepts it
    fields = {"payload": payload, "timestamp": str(ts), "nonce": nonce, "signature": server}
    assert signing.verify(secret, json.loads(payload), fields, now=ts, window_s=300).nonce == nonce


def test_the_readme_recipe_by_hand_works_as_written(world):
    """README "Submitting a search without Python": the by-hand block, run as written (names and port
    put in), gets a candidate list for an image over 200 KB."""
    import re
    import time
    import uuid

    text = (REPO / "README.md").read_text()
    block = text.split("By hand, the shell client's steps are:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if "XREAD BLOCK 0" not in ln]  # the one line that waits forever
    rid = uuid.uuid4().hex
    port = world["env"]["QUORUM_REDIS_PORT"]
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    script = script.replace("7f3c9a102b1e4c7a9a550d6f2f1d8e21", rid).replace("inv-0042", USER)
    script = re.sub(r"\blasd\b", AGENCY, script).replace("-p 6390", f"-p {port}")
    work = world["tmp"] / "by-hand"
    work.mkdir()
    (work / "schemas").symlink_to(REPO / "schemas")
    shutil.copy(world["big"][1], work / "probe.jpg")  # (a PNG: the name does not matter)
    env = {
        **world["env"],
        "LASD_REDIS_PASSWORD": world["env"]["REDISCLI_AUTH"],
        "LASD_SECRET": world["env"]["QUORUM_AGENCY_SECRET"],
        "PATH": f"{NODE_DIR / 'node_modules' / '.bin'}:{os.environ['PATH']}",  # ajv
    }
    env.pop("REDISCLI_AUTH")
    out = subprocess.run(["bash", "-c", script], cwd=str(work), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "PONG" and "AUTH failed" not in out.stderr, out.stderr
    assert any(re.fullmatch(r"\d+-\d+", ln) for ln in out.stdout.splitlines()), out.stdout  # XADD's entry id
    deadline = time.monotonic() + 180
    while (raw := world["admin"].get(keys.result_key(AGENCY, rid))) is None:
        assert time.monotonic() < deadline, "no answer to the README recipe's request"
        time.sleep(0.5)
    result = json.loads(raw)
    assert result["type"] == "candidate_list", result
    assert result["candidates"][0]["subject_id"] == world["big"][0]
