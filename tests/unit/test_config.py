import pytest

from quorum.cli.stack import settings_env
from quorum.core.config import Settings, load_settings, settings
from quorum.core.engines import ENGINE_NAMES


def test_defaults_run_locally():
    s = load_settings(env={})
    assert s.store_kind == "disk" and s.redis_url.startswith("redis://127.0.0.1")
    assert s.engines == ("sface", "facenet", "arcface")


def test_env_file_and_overrides_precedence(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text('s3_endpoint = "minio:9000"\nfusion_deadline_s = 5\nengines = ["sface", "dlib"]\n')
    s = load_settings(env={"QUORUM_SETTINGS": str(f), "QUORUM_FUSION_DEADLINE_S": "7.5"})
    assert s.store_kind == "s3" and s.fusion_deadline_s == 7.5 and s.engines == ("sface", "dlib")
    assert load_settings(env={"QUORUM_S3_SECURE": "true"}).s3_secure is True
    with pytest.raises(ValueError, match="unknown settings"):
        load_settings(env={}, no_such_setting=1)


def test_env_beats_file_and_overrides_beat_env(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text('redis_url = "redis://file:1/0"\nhnsw_m = 8\n')
    env = {"QUORUM_SETTINGS": str(f), "QUORUM_REDIS_URL": "redis://env:2/0"}
    s = load_settings(env=env)
    assert s.redis_url == "redis://env:2/0" and s.hnsw_m == 8  # env over file; file over default
    assert load_settings(env=env, redis_url="redis://override:3/0").redis_url == "redis://override:3/0"


def test_given_env_replaces_os_environ(monkeypatch):
    monkeypatch.setenv("QUORUM_HNSW_M", "7")
    assert load_settings().hnsw_m == 7
    assert load_settings(env={}).hnsw_m == Settings.model_fields["hnsw_m"].default


def test_unknown_key_in_file_refused(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text('hnsw_m = 8\nredis_ulr = "redis://typo:1/0"\n')
    with pytest.raises(ValueError, match=r"unknown settings: \['redis_ulr'\]"):
        load_settings(env={"QUORUM_SETTINGS": str(f)})


def test_missing_settings_file_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="QUORUM_SETTINGS"):
        load_settings(env={"QUORUM_SETTINGS": str(tmp_path / "absent.toml")})


def test_comma_separated_engines():
    assert load_settings(env={"QUORUM_ENGINES": "sface,dlib"}).engines == ("sface", "dlib")
    assert load_settings(env={"QUORUM_ENGINES": " facenet , sface "}).engines == ("facenet", "sface")
    assert load_settings(env={}, engines=["dlib"]).engines == ("dlib",)


@pytest.mark.parametrize("engines", ["sface,vggface", "vggface"])
def test_unknown_engine_refused_with_the_known_ones(engines):
    with pytest.raises(ValueError) as err:
        load_settings(env={"QUORUM_ENGINES": engines})
    text = str(err.value)
    assert "engines" in text and "unknown engine 'vggface'" in text
    assert "known engines: " + ", ".join(ENGINE_NAMES) in text


def test_no_engine_or_a_repeated_one_refused():
    with pytest.raises(ValueError, match="at least one engine"):
        load_settings(env={"QUORUM_ENGINES": ""})
    with pytest.raises(ValueError, match="named twice"):
        load_settings(env={"QUORUM_ENGINES": "sface,sface"})


def test_device_must_be_auto_cpu_or_gpu():
    assert load_settings(env={"QUORUM_DEVICE": "gpu"}).device == "gpu"
    with pytest.raises(ValueError, match="device"):
        load_settings(env={"QUORUM_DEVICE": "tpu"})


def test_settings_are_frozen_and_copied_with_changes():
    s = load_settings(env={})
    with pytest.raises(ValueError):
        s.redis_url = "redis://elsewhere:1/0"  # type: ignore[misc]
    t = s.model_copy(update={"redis_url": "redis://elsewhere:1/0"})
    assert t.redis_url == "redis://elsewhere:1/0" and s.redis_url != t.redis_url
    assert hash(s) == hash(load_settings(env={}))


def test_settings_is_read_once():
    assert settings() is settings()


def test_child_processes_see_the_same_settings():
    s = load_settings(
        env={}, redis_url="redis://127.0.0.1:1234/3", engines=("sface",), s3_secure=True, fusion_deadline_s=3.0
    )
    env = {k: v for k, v in settings_env(s).items() if k.startswith("QUORUM_")}
    assert load_settings(env=env) == s
    assert isinstance(s, Settings)


def test_secret_files_set_settings(tmp_path):
    """QUORUM_<NAME>_FILE: compose secrets, so credentials stay out of the container's environment."""
    url = tmp_path / "redis-url"
    url.write_text("rediss://gateway:s3cret@redis:6379/0?ssl_cert_reqs=required\n")
    key = tmp_path / "s3-secret"
    key.write_text("abc def")
    s = load_settings(env={"QUORUM_REDIS_URL_FILE": str(url), "QUORUM_S3_SECRET_KEY_FILE": str(key)})
    assert s.redis_url == "rediss://gateway:s3cret@redis:6379/0?ssl_cert_reqs=required"  # trailing newline dropped
    assert s.s3_secret_key == "abc def"
    # Settings whose own name ends in _file stay plain paths.
    s = load_settings(env={"QUORUM_SECRETS_KEY_FILE": str(key)})
    assert s.secrets_key_file == str(key)
    # Not a setting: ignored, like any other foreign variable (QUORUM_ENV_FILE is compose's).
    assert load_settings(env={"QUORUM_ENV_FILE": ".env"}).redis_url.startswith("redis://127.0.0.1")


def test_secret_file_conflicts_and_missing_files_refused(tmp_path):
    f = tmp_path / "u"
    f.write_text("redis://x:1/0")
    with pytest.raises(ValueError, match="both QUORUM_REDIS_URL and QUORUM_REDIS_URL_FILE"):
        load_settings(env={"QUORUM_REDIS_URL": "redis://y:2/0", "QUORUM_REDIS_URL_FILE": str(f)})
    with pytest.raises(ValueError, match=r"QUORUM_DATABASE_URL_FILE names .* cannot be read"):
        load_settings(env={"QUORUM_DATABASE_URL_FILE": str(tmp_path / "absent")})
