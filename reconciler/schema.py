"""JSON Schemas of the manifest and the status documents, generated from the pydantic models.

The checked-in copies under schemas/ are for editors and for tools that never import Python;
tests/test_schema.py fails when they drift from the models. Regenerate with:

    python3 -m reconciler.schema schemas/
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from reconciler.fsutil import atomic_write
from reconciler.models import AgentStatus, ContainerStatus, Manifest

_DIALECT = "https://json-schema.org/draft/2020-12/schema"

MANIFEST_SCHEMA_FILE = "manifest.schema.json"
STATUS_SCHEMA_FILE = "status.schema.json"

# Both kinds of file live in the status directory; `kind` tells them apart.
_StatusDocument = Annotated[Union[ContainerStatus, AgentStatus], Field(discriminator="kind")]


def manifest_schema() -> dict[str, Any]:
    """What an operator may write: validation mode, so "128Mi" and "10secs" are accepted."""
    schema = Manifest.model_json_schema(mode="validation")
    return {"$schema": _DIALECT, "title": "reconciler/v1 Container manifest", **_without_title(schema)}


def status_schema() -> dict[str, Any]:
    """What a reader of the status directory may find: <name>.json or _agent.json.

    Validation mode, because ResourceStatistics drops unmeasured fields when serialised and the
    serialisation-mode schema of such a model says nothing about its fields.
    """
    schema = TypeAdapter(_StatusDocument).json_schema(mode="validation")
    return {"$schema": _DIALECT, "title": "reconciler/v1 status document", **schema}


def schema_files() -> dict[str, str]:
    """File name -> exact text, so the checked-in copies can be compared byte for byte."""
    return {
        MANIFEST_SCHEMA_FILE: _render(manifest_schema()),
        STATUS_SCHEMA_FILE: _render(status_schema()),
    }


def write_schemas(directory: str) -> list[str]:
    """Write the schema files into `directory` (created if missing); returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = os.path.join(directory, name)
        atomic_write(path, text.encode(), durable=False)
        written.append(path)
    return written


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _without_title(schema: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in schema.items() if key != "title"}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python3 -m reconciler.schema DIR", file=sys.stderr)
        raise SystemExit(2)
    for written_path in write_schemas(sys.argv[1]):
        print(written_path)
