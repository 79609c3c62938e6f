"""Every example manifest starts with a yaml-language-server modeline naming schemas/, so editors
(VS Code's YAML extension, Neovim's yamlls, ...) validate it as people type."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

MODELINE = re.compile(r"^# yaml-language-server: \$schema=(?P<path>\S+)$")
EXAMPLES = sorted(p for d in ("manifests", "examples") if (REPO / d).is_dir()
                  for p in (REPO / d).rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_starts_with_a_modeline_pointing_at_the_manifest_schema(path):
    first = path.read_text().splitlines()[0]
    match = MODELINE.match(first)
    assert match, f"{path.relative_to(REPO)}: first line {first!r} is not a yaml-language-server modeline"
    target = (path.parent / match["path"]).resolve()
    assert target == (REPO / "schemas" / "manifest.schema.json").resolve(), target


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_is_valid_for_the_schema_editors_use(path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = yaml.safe_load((REPO / "schemas" / "manifest.schema.json").read_text())
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is not None:
            jsonschema.validate(doc, schema)


def test_the_agent_still_validates_the_examples():
    done = subprocess.run([sys.executable, "-m", "reconciler", "validate", *map(str, EXAMPLES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
