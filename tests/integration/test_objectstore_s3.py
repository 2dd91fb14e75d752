"""The S3 store against a real S3 server (Ceph radosgw), same contract as the disk store."""

import pytest

from quorum.core.errors import Code, InputError, ServiceError
from quorum.core.objectstore import S3Store, content_key, put_content

pytestmark = pytest.mark.integration


@pytest.fixture()
def store(s3_server):
    e = s3_server.env
    return S3Store(e["S3_ENDPOINT"], e["S3_ACCESS_KEY"], e["S3_SECRET_KEY"], "quorum-store-test")


def test_put_get_size_list_delete(store):
    data = b"\x89PNG fake but bytes are bytes"
    key = put_content(store, "probes", data)
    assert key == content_key("probes", data)
    assert store.get(key) == data and store.size(key) == len(data)
    assert key in store.list("probes")
    store.delete(key)
    assert store.size(key) is None


def test_missing_and_too_large(store):
    with pytest.raises(InputError) as e:
        store.get("probes/" + "f" * 64)
    assert e.value.code == Code.IMAGE_MISSING
    key = put_content(store, "probes", b"y" * 1000)
    with pytest.raises(InputError) as e:
        store.get(key, max_bytes=100)
    assert e.value.code == Code.IMAGE_TOO_LARGE


def test_unreachable_endpoint_is_a_retryable_service_error():
    from tests.integration.servers import free_port

    with pytest.raises(ServiceError) as e:
        S3Store(f"127.0.0.1:{free_port()}", "a", "b", "bucket")
    assert e.value.code == Code.STORE_UNAVAILABLE and e.value.retryable
