import pytest

from quorum.config import Settings, load_settings
from quorum.stack import settings_env


def test_defaults_run_locally():
    s = load_settings(env={})
    assert s.store_kind == "disk" and s.redis_url.startswith("redis://127.0.0.1")
    assert s.engines == ("sface", "dlib", "facenet")


def test_env_file_and_overrides_precedence(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text('s3_endpoint = "minio:9000"\nfusion_deadline_s = 5\nengines = ["sface", "dlib"]\n')
    s = load_settings(env={"QUORUM_SETTINGS": str(f), "QUORUM_FUSION_DEADLINE_S": "7.5"})
    assert s.store_kind == "s3" and s.fusion_deadline_s == 7.5 and s.engines == ("sface", "dlib")
    assert load_settings(env={"QUORUM_S3_SECURE": "true"}).s3_secure is True
    with pytest.raises(ValueError, match="unknown settings"):
        load_settings(env={}, no_such_setting=1)


def test_child_processes_see_the_same_settings():
    s = load_settings(env={}, redis_url="redis://127.0.0.1:1234/3", engines=("sface",), s3_secure=True,
                      fusion_deadline_s=3.0)
    env = {k: v for k, v in settings_env(s).items() if k.startswith("QUORUM_")}
    assert load_settings(env=env) == s
    assert isinstance(s, Settings)
