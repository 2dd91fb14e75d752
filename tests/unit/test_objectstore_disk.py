"""The embedded disk store (the S3 store is tested against a real radosgw in integration)."""

import pytest

from quorum.core.errors import Code, InputError
from quorum.core.objectstore import DiskStore, content_key, put_content


def test_content_addressed_put_get_list_delete(tmp_path):
    s = DiskStore(tmp_path)
    key = put_content(s, "probes", b"hello")
    assert key == content_key("probes", b"hello") and key.startswith("probes/")
    assert put_content(s, "probes", b"hello") == key
    assert s.get(key) == b"hello" and s.size(key) == 5
    assert s.list("probes") == [key]
    s.delete(key)
    assert s.size(key) is None and s.list("probes") == []


def test_missing_too_large_and_malformed_keys(tmp_path):
    s = DiskStore(tmp_path)
    with pytest.raises(InputError) as e:
        s.get("probes/" + "0" * 64)
    assert e.value.code == Code.IMAGE_MISSING
    key = put_content(s, "probes", b"x" * 100)
    with pytest.raises(InputError) as e:
        s.get(key, max_bytes=10)
    assert e.value.code == Code.IMAGE_TOO_LARGE
    for bad in ("../etc/passwd", "probes/../../x", "/abs/path", "probes"):
        with pytest.raises(InputError):
            s.get(bad)
