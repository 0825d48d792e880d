"""`wanwu stage collect` on the real datasets in ../shared/datasets, read as they are on disk.

The counts come from each dataset's SOURCE.md: coco8 8 images / 30 boxes (YOLO), raccoon 200 images / 217 boxes
(Pascal VOC), hymenoptera 398 files in class folders ants / bees. Raccoon holds 4 pairs of byte-identical
photos (raccoon-11/116, -52/74, -65/98, -83/120), each pair annotated twice: collect stores each picture once,
reports the second file as a duplicate and does not import its second annotation, so "200 images, 217 boxes"
reads as 196 stored + 4 duplicates and 213 imported + 4 on duplicates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from wanwu import contracts

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_datasets):
    root = tmp_path_factory.mktemp("project")
    (root / "ontology.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "ontology.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return root


def collect_stage(project: Path, name: str, source: dict) -> Path:
    """Run `wanwu stage collect` with a params file holding this one source; returns the data folder."""
    from wanwu.cli import app

    params = project / f"params_{name}.yaml"
    params.write_text(
        yaml.safe_dump({"project": {"data_dir": f"data_{name}"}, "collect": {"sources": [source], "workers": 2}}),
        encoding="utf-8",
    )
    out = CliRunner().invoke(app, ["stage", "collect", "--params", str(params)])
    assert out.exit_code == 0, out.output + repr(out.exception)
    assert "manifest" in out.output  # the summary says where the outputs are
    return project / f"data_{name}"


def read(data: Path) -> dict:
    c = data / "collect"
    return {
        "manifest": contracts.read("manifest", c / "manifest.parquet"),
        "rejects": contracts.read("rejects", c / "rejects.parquet"),
        "human": contracts.read("labels", c / "human_labels.parquet"),
        "image_labels": contracts.read("image_labels", c / "image_labels.parquet"),
    }


def test_coco8_yolo(project, shared_datasets, ontology):
    t = read(collect_stage(project, "coco8", {"uri": str(shared_datasets / "coco8")}))
    assert len(t["manifest"]) == 8 and set(t["manifest"]["split"]) == {"seed"}
    assert len(t["human"]) == 30 and len(t["rejects"]) == 0
    by_name = t["human"].groupby("source_label").size().to_dict()
    assert by_name["person"] == 10 and by_name["orange"] == 4 and by_name["dog"] == 1  # SOURCE.md's class counts
    assert set(t["human"].loc[t["human"]["source_label"] == "dog", "label_id"]) == {ontology.lookup("dog")}
    assert set(t["human"].loc[t["human"]["source_label"] == "person", "label_id"]) == {-1}  # kept as other
    m = t["manifest"].set_index("sha256")
    for row in t["human"].itertuples():  # boxes lie on the stored image's pixels
        assert (
            0 <= row.x1 < row.x2 <= m.loc[row.sha256, "width"] and 0 <= row.y1 < row.y2 <= m.loc[row.sha256, "height"]
        )


def test_raccoon_voc(project, shared_datasets, ontology):
    data = collect_stage(project, "raccoon", {"uri": str(shared_datasets / "raccoon")})
    t = read(data)
    dups = t["rejects"][t["rejects"]["reason"] == "duplicate"]
    assert len(t["rejects"]) == len(dups)  # nothing else rejected
    assert len(t["manifest"]) + len(dups) == 200  # SOURCE.md: 200 images
    assert len(t["human"]) + 4 == 217  # SOURCE.md: 217 boxes; 4 sit on the duplicate files
    assert (len(t["manifest"]), len(dups)) == (196, 4)
    assert set(dups["sha256"]) <= set(t["manifest"]["sha256"])
    assert all("not imported" in d for d in dups["detail"])
    assert set(t["human"]["source_label"]) == {"raccoon"} and set(t["human"]["label_id"]) == {-1}
    near = data / "collect" / "near_duplicates.parquet"
    assert near.is_file()  # raccoon also holds re-encoded copies: reported there, kept in the manifest


def test_hymenoptera_class_folders(project, shared_datasets):
    t = read(collect_stage(project, "hymenoptera", {"uri": str(shared_datasets / "hymenoptera"), "format": "folders"}))
    assert len(t["manifest"]) == 398 and len(t["rejects"]) == 0  # SOURCE.md: 398 files
    counts = t["image_labels"]["source_label"].value_counts().to_dict()
    assert counts == {"ants": 124 + 70, "bees": 121 + 83}
    assert set(t["manifest"]["format"]) == {"JPEG", "GIF"}  # imageNotFound.gif is stored like any picture


def test_rerun_on_shared_data_adds_nothing(project, shared_datasets):
    from tasks import collect
    from wanwu.config import load_params

    p = load_params(project / "params_raccoon.yaml")
    if not (project / "data_raccoon" / "collect" / "manifest.parquet").is_file():
        collect.run(p.collect, p.project)  # the first collect, when this test runs alone
    again = collect.run(p.collect, p.project)
    # nothing decoded again: every file is skipped by (source, size, mtime); timing is measured in bench/, not here
    assert again.images_added == 0 and again.images_skipped == 200 and again.images_reindexed == 0
