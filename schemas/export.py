"""Write the JSON Schema files for the public messages: ``python -m quorum.schemas.export [DIR]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .job import Job
from .messages import EngineResult, ProbeRequest, result_json_schema

SCHEMA_DIR = Path(__file__).resolve().parent / "json"


def generated() -> dict[str, dict]:
    base = "https://quorum.example/schemas/v1/"
    out = {
        "probe-request.schema.json": ProbeRequest.model_json_schema(),
        "result.schema.json": result_json_schema(),
        "engine-result.schema.json": EngineResult.model_json_schema(),
        "job.schema.json": Job.model_json_schema(),  # internal: the search in flight between stages
    }
    # "discriminator" is OpenAPI's keyword, not JSON Schema's: validators in strict mode (ajv) refuse it,
    # and "oneOf" over branches whose "type" is a "const" already tells a candidate list from an error.
    out["result.schema.json"].pop("discriminator", None)
    for name, schema in out.items():
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = base + name
    return out


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else SCHEMA_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name, schema in generated().items():
        (target / name).write_text(render(schema))
        print(target / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
