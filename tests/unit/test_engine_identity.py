"""An engine's version and dimension without its model (``workers.engines.engine_identity``): what a shard
worker runs on, so it must be exactly what the loaded engine says, with the detector tag and the test
suffix applied the same way."""

from __future__ import annotations

import pytest

from quorum.core.config import load_settings
from quorum.workers.engines import engine_identity, get_engine


@pytest.mark.parametrize("name", ["sface", "arcface"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"detector": "scrfd"}, {"engine_version_suffix": "upgrade-test"}],
    ids=["plain", "scrfd", "suffix"],
)
def test_identity_without_the_model_is_the_loaded_engines(name, overrides, tmp_path):
    s = load_settings(env={}, home=str(tmp_path), **overrides)
    engine = get_engine(name, device="cpu", s=s)
    assert engine_identity(name, s) == (engine.version, engine.dim)


def test_every_engine_states_its_version_without_loading(tmp_path):
    import importlib

    from quorum.core.engines import ENGINES

    s = load_settings(env={}, home=str(tmp_path))
    for name, spec in ENGINES.items():
        cls = getattr(importlib.import_module(spec.module), spec.cls)
        version, dim = engine_identity(name, s)
        assert version == cls.version_for() and dim == cls.dim in (128, 512), name
