"""`reconciler images list | prune`: the store as the agent with the same flags uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.images.store import IMAGE_RECORD, ImageStore
from tests.imagebuild import File, build_image, busybox_layer, layer


@pytest.fixture
def stored(tmp_path: Path) -> dict:
    registry, work = tmp_path / "registry", tmp_path / "work"
    registry.mkdir()
    build_image(str(registry), "busybox:latest")
    build_image(str(registry), "app:1", layers=[busybox_layer(), layer(File("/app", b"x"))])
    build_image(str(registry), "other:2", layers=[layer(File("/other", b"y"))])
    store = ImageStore(str(registry), str(work / "store" / "docker"))
    used = store.pull("app:1", in_use_record=str(work / "containers" / "c1" / IMAGE_RECORD))
    unused = store.pull("other:2")
    store.pull("busybox:latest")
    flags = ["--work_dir", str(work), "--docker_registry", str(registry)]
    return {"store": store, "used": used, "unused": unused, "flags": flags}


def test_list_shows_every_stored_image(stored: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["images", "list", *stored["flags"]]) == 0
    table = capsys.readouterr().out
    assert "REFERENCES" in table.splitlines()[0]
    for ref in ("busybox:latest", "app:1", "other:2"):
        assert ref in table
    assert main(["images", "list", "--json", *stored["flags"]]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert {d["id"] for d in docs} == {stored["used"].id, stored["unused"].id, stored["store"].pull("busybox:latest").id}


def test_prune_removes_only_layers_no_container_uses(stored: dict, capsys: pytest.CaptureFixture[str]) -> None:
    used, unused = stored["used"], stored["unused"]
    assert main(["images", "prune", *stored["flags"]]) == 0
    out = capsys.readouterr().out
    assert f"removed layer sha256:{unused.layer_ids[0]}" in out
    for path in used.layers:                          # app:1 (and busybox's layer it shares) stay
        assert os.path.isdir(path)
    assert not os.path.exists(unused.layers[0])
    assert main(["images", "list", "--json", *stored["flags"]]) == 0
    # busybox:latest keeps its record: its one layer is app:1's lowest, in use.
    assert sorted(ref for d in json.loads(capsys.readouterr().out) for ref in d["references"]) == ["app:1", "busybox:latest"]


def test_an_unreadable_in_use_record_stops_prune(stored: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "work" / "containers" / "c2" / IMAGE_RECORD
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    assert main(["images", "prune", *stored["flags"]]) == 1
    assert "image.json" in capsys.readouterr().err
    assert os.path.exists(stored["unused"].layers[0])     # nothing removed


def test_leftovers_of_crashed_pulls_are_removed_when_no_pull_runs(stored: dict) -> None:
    store = stored["store"]
    (Path(store.staging_dir) / "half-extracted" / "rootfs").mkdir(parents=True)
    (Path(store.gc_dir) / "old-layer").mkdir()
    with store._flock("store", shared=True):       # a pull under way (flock: per open file, so even here)
        other = ImageStore(store.registry_dir, store.store_dir)
        assert other.clean_leftovers() == 0
    assert store.clean_leftovers() == 2
    assert os.listdir(store.staging_dir) == [] and os.listdir(store.gc_dir) == []
