"""onnxruntime, as every onnxruntime model here runs it (the engines, SCRFD): providers, sessions, and
runs with IO binding on CUDA (a leaf: imports nothing of Quorum's).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def providers_for(device: str) -> list[str]:
    """onnxruntime providers: CUDA first where asked for (gpu) or allowed (auto) and present; CPU always
    as the fallback. Every onnxruntime engine picks its providers here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("gpu", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(model: bytes | str, device: str, threads: int = 0) -> Any:
    """An onnxruntime session (all graph optimisations) on :func:`providers_for`'s providers;
    ``threads``: intra-op threads on the CPU (0: onnxruntime's default, one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, opts, providers=providers_for(device))


def ort_provider(session: Any) -> str:
    """The provider a session actually runs on (onnxruntime falls back to CPU if CUDA fails to load)."""
    return str(session.get_providers()[0])


def ort_run(session: Any, input_name: str, blob: np.ndarray, bind: str | None = None) -> np.ndarray:
    """The first output for one input. On the CUDA provider through IO binding (the output stays on the
    device until the one copy back, the input is copied once): ``bind`` is the output's device, by
    default ``cuda`` when the session runs on CUDA, else a plain ``run``; ``bind="cpu"`` exercises the
    binding path on a CPU session (tests)."""
    if bind is None and ort_provider(session) == "CUDAExecutionProvider":
        bind = "cuda"
    if bind is None:
        return np.asarray(session.run(None, {input_name: blob})[0])
    binding = session.io_binding()
    binding.bind_cpu_input(input_name, np.ascontiguousarray(blob))
    output = session.get_outputs()[0].name
    binding.bind_output(output, bind)
    session.run_with_iobinding(binding)
    return np.asarray(binding.copy_outputs_to_cpu()[0])
