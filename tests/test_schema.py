"""The JSON Schemas under schemas/ are generated from the models and must never go stale."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from reconciler.models import ContainerStatus, ResourceStatistics
from reconciler.schema import (
    MANIFEST_SCHEMA_FILE,
    STATUS_SCHEMA_FILE,
    manifest_schema,
    schema_files,
    status_schema,
    write_schemas,
)
from tests.conftest import read_status_file

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "regenerate with: python3 -m reconciler.schema schemas/"


@pytest.mark.parametrize("name", [MANIFEST_SCHEMA_FILE, STATUS_SCHEMA_FILE])
def test_checked_in_schema_is_current(name: str) -> None:
    checked_in = REPO / "schemas" / name
    assert checked_in.exists(), f"schemas/{name} is missing; {REGENERATE}"
    assert checked_in.read_text() == schema_files()[name], f"schemas/{name} is stale; {REGENERATE}"


def test_the_entry_point_writes_both_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "reconciler.schema", str(out)], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == [str(out / MANIFEST_SCHEMA_FILE), str(out / STATUS_SCHEMA_FILE)]
    for name, text in schema_files().items():
        assert (out / name).read_text() == text


def test_write_schemas_replaces_existing_files(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_SCHEMA_FILE).write_text("stale")
    write_schemas(str(tmp_path))
    assert json.loads((tmp_path / MANIFEST_SCHEMA_FILE).read_text()) == manifest_schema()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_SCHEMA_FILE, STATUS_SCHEMA_FILE]


def _objects(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            found.append(node)
        for value in node.values():
            found.extend(_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_objects(value))
    return found


def test_schemas_forbid_unknown_fields_everywhere() -> None:
    for schema in (manifest_schema(), status_schema()):
        objects = _objects(schema)
        assert objects
        assert all(o.get("additionalProperties") is False for o in objects), [o.get("title") for o in objects]


def test_manifest_schema_accepts_mesos_spellings() -> None:
    defs = manifest_schema()["$defs"]
    mem = defs["Resources"]["properties"]["mem"]["anyOf"][0]
    assert {alt["type"] for alt in mem["anyOf"]} == {"number", "string"}
    kill = defs["ContainerSpec"]["properties"]["kill_grace_period"]
    assert {alt["type"] for alt in kill["anyOf"]} == {"number", "string"}
    assert manifest_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_status_schema_covers_both_status_files() -> None:
    schema = status_schema()
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(schema["discriminator"]["mapping"]) == {"ContainerStatus", "AgentStatus"}
    stats = schema["$defs"]["ResourceStatistics"]["properties"]
    assert "mem_rss_bytes" in stats and "cpus_throttled_time_secs" in stats


def test_example_manifests_satisfy_the_manifest_schema() -> None:
    validator = jsonschema.Draft202012Validator(manifest_schema())
    examples = sorted((REPO / "manifests").glob("*.yaml"))
    assert examples
    for path in examples:
        for document in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader):
            validator.validate(document)
    with pytest.raises(jsonschema.ValidationError):
        bad = yaml.load((REPO / "manifests" / "web.yaml").read_text(), Loader=yaml.CSafeLoader)
        bad["spec"]["resurces"] = {}
        validator.validate(bad)
    ok = yaml.load((REPO / "manifests" / "web.yaml").read_text(), Loader=yaml.CSafeLoader)
    ok["spec"]["resources"]["mem"] = "64Mi"
    ok["spec"]["kill_grace_period"] = "500ms"
    validator.validate(ok)


def test_a_status_document_satisfies_the_status_schema() -> None:
    status = ContainerStatus(name="web", phase="Running", updated_at="t", pid=42,
                             statistics=ResourceStatistics(processes=1))
    jsonschema.Draft202012Validator(status_schema()).validate(status.model_dump(mode="json"))


def test_a_status_file_that_breaks_the_schema_fails_the_test_that_reads_it(tmp_path: Path) -> None:
    """Every status file the tests read (tests/conftest.read_status_file) is held to the checked-in schema."""
    good = ContainerStatus(name="web", phase="Running", updated_at="t", pid=42).model_dump(mode="json")
    web = tmp_path / "web.json"
    web.write_text(json.dumps(good))
    assert read_status_file(web) == good
    assert read_status_file(tmp_path / "gone.json") is None
    web.write_text(json.dumps({**good, "pid": "42"}))
    with pytest.raises(AssertionError, match=f"^status file {re.escape(str(web))} does not satisfy "
                       r"schemas/status\.schema\.json \(ContainerStatus\): \$\.pid: '42' is not valid under any"):
        read_status_file(web)
    web.write_text(json.dumps({**good, "restart": 1}))
    with pytest.raises(AssertionError, match=r"\$: Additional properties are not allowed \('restart' was"):
        read_status_file(web)
    (tmp_path / "_agent.json").write_text(json.dumps(good))
    with pytest.raises(AssertionError, match="has kind 'ContainerStatus'; _agent.json must hold kind 'AgentStatus'$"):
        read_status_file(tmp_path / "_agent.json")
    (tmp_path / "api.json").write_text(json.dumps({**good, "kind": "AgentStatus"}))
    with pytest.raises(AssertionError, match="has kind 'AgentStatus'; api.json must hold kind 'ContainerStatus'$"):
        read_status_file(tmp_path / "api.json")
    web.write_text(json.dumps(good)[:-5])
    with pytest.raises(AssertionError, match=f"^status file {re.escape(str(web))} is not JSON"):
        read_status_file(web)
