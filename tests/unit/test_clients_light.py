"""The light clients' pure parts: the Python package's copy of the request schema is the published one,
and it signs the shared cross-language vectors as the server does (without importing the server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VECTORS = json.loads((REPO / "clients" / "vectors.json").read_text())


@pytest.fixture(scope="module")
def light():
    sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
    try:
        import quorum_client

        yield quorum_client
    finally:
        sys.path.remove(str(REPO / "clients" / "python" / "src"))


def test_the_packaged_schema_is_the_published_one():
    packaged = REPO / "clients" / "python" / "src" / "quorum_client" / "probe-request.schema.json"
    assert packaged.read_text() == (REPO / "schemas" / "json" / "probe-request.schema.json").read_text(), (
        "copy schemas/json/probe-request.schema.json into clients/python/src/quorum_client/"
    )


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_light_client_signs_the_shared_vectors(light, vector):
    assert light.canonical_payload(json.loads(vector["payload"])).decode() == vector["canonical"]
    fields = light.sign(VECTORS["secret"], vector["payload"], timestamp=VECTORS["timestamp"], nonce=VECTORS["nonce"])
    assert fields["signature"] == vector["signature"]


def test_light_client_refuses_a_request_breaking_the_schema(light):
    doc = light.build_request(
        "lasd", "inv-1", b"img", case_number="C-1", offence_code="PC211", purpose="criminal-investigation"
    )
    light.validate_request(doc)
    with pytest.raises(light.InvalidRequest) as exc:
        light.validate_request({**doc, "candidates": 0, "surprise": 1})
    assert len(exc.value.problems) == 2


def test_node_client_unit_tests():
    """clients/node/test (node --test): the Node client signs the same vectors and validates with ajv."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None or not (REPO / "clients" / "node" / "node_modules" / "ajv").is_dir():
        pytest.fail("node or the Node client's dependencies are missing: run scripts/setup.sh (npm ci in clients/node)")
    out = subprocess.run(
        [node, "--test", "test/"], cwd=REPO / "clients" / "node", capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
