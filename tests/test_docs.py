"""docs/ stays true to the code: the flags page is generated from reconciler/config.py and current,
every link between pages resolves, and the Kubernetes page covers every value of the chart."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

from reconciler import config

from tests.conftest import REPO

DOCS = REPO / "docs"


def test_every_flag_of_the_agent_is_in_docs_flags_md():
    page = (DOCS / "flags.md").read_text()
    missing = [name for name in config.FLAG_NAMES if f"`--{name}`" not in page or f"RECONCILER_{name.upper()}" not in page]
    assert not missing, f"docs/flags.md lacks {missing}: run python3 docs/generate_flags.py"


def test_docs_flags_md_is_what_the_generator_writes_now():
    done = subprocess.run([sys.executable, str(DOCS / "generate_flags.py"), "--check"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_flag_has_a_section_and_a_description():
    # A new AgentConfig field is a new flag of `run` and `once`: it needs its entry in FLAG_HELP.
    undescribed = [name for name in config.FLAG_NAMES
                   if name not in config.FLAG_HELP or not config.FLAG_HELP[name].meaning.strip()
                   or not config.FLAG_HELP[name].section.strip()]
    assert not undescribed, f"flags without a description in FLAG_HELP (reconciler/config.py): {undescribed}"
    gone = [name for name in config.FLAG_HELP if name not in config.FLAG_NAMES]
    assert not gone, f"FLAG_HELP describes flags that are no longer flags: {gone}"


def test_the_generator_refuses_a_flag_without_a_description(monkeypatch):
    spec = importlib.util.spec_from_file_location("generate_flags", DOCS / "generate_flags.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    monkeypatch.delitem(config.FLAG_HELP, "resync_interval")
    with pytest.raises(SystemExit, match="--resync_interval has no description"):
        generator.generate()


def test_links_between_pages_resolve():
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def test_the_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert [p for p in pages if f"({p})" not in index] == []


def test_the_kubernetes_page_covers_every_value_of_the_chart():
    values = yaml.safe_load((REPO / "helm" / "reconciler" / "values.yaml").read_text())
    page = (DOCS / "kubernetes.md").read_text()
    keys = [f"`{k}" for k in values]
    keys += [f"{k}.{sub}" for k in ("agent", "http", "manifests", "serviceAccount") for sub in values[k]]
    missing = [k for k in keys if k not in page]
    assert not missing, f"docs/kubernetes.md does not mention the values {missing}"
