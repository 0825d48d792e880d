"""Bad input beyond collect: each gets a clear error naming the file and the fix (issue 9's corpus).

The corpus itself (tests/_bad_inputs.py) builds each broken input and runs it through the entry point a run
uses; docs/bad_inputs.md is its table. Finer cases: test_config.py, test_ontology.py, test_sources.py.
"""

from __future__ import annotations

import zipfile

import pytest
from _bad_inputs import CASES

from wanwu.checkpoints import CheckpointError, check_model_source, load_ultralytics


@pytest.mark.parametrize("case", CASES, ids=[c.make.__name__ for c in CASES])
def test_each_bad_input_is_told_with_its_file_and_the_fix(case, tmp_path):
    told = case.make(tmp_path)
    assert str(told.file) in told.message, told.message
    assert case.fix in told.message, told.message
    assert "Traceback" not in told.message and len(told.message) < 800


def test_a_coco_json_whose_ids_match_nothing_adds_no_image_as_labeled_empty(tmp_path):
    """Refused as a whole: imported, every image would have entered the seed set as 'no objects'."""
    from _bad_inputs import coco_no_image_id_matches

    from wanwu import contracts

    told = coco_no_image_id_matches(tmp_path)
    assert told.stopped and "101, 102" in told.message and "1, 2" in told.message
    manifest = tmp_path / "data" / "collect" / "manifest.parquet"
    assert not manifest.exists() or contracts.read("manifest", manifest).empty


def test_a_real_detector_checkpoint_loads_and_the_task_is_checked(tmp_path):
    from ultralytics import YOLO

    pt = tmp_path / "det.pt"
    YOLO("yolo11n.yaml").save(pt)
    model, _ = load_ultralytics(pt, "autolabel.proposer", task="detect")
    assert model.task == "detect"
    with pytest.raises(CheckpointError, match="not a classify one"):
        load_ultralytics(pt, "teacher path", task="classify")


def test_a_text_file_named_pt_is_refused_with_its_name_and_the_fix(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_text("garbage\n")
    with pytest.raises(CheckpointError) as e:
        check_model_source(bad, "train.model")
    msg = str(e.value)
    assert str(bad) in msg and "train.model" in msg and "not a PyTorch checkpoint" in msg and "b'garbage\\n'" in msg


def test_empty_missing_and_foreign_zip_files_are_refused(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        check_model_source(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model_source(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model_source(tmp_path / "sub" / "model.yaml")
    z = tmp_path / "photos.pt"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("a.jpg", b"x")
    with pytest.raises(CheckpointError, match="no data.pkl"):
        check_model_source(z)


def test_a_real_checkpoint_and_a_model_yaml_pass(tmp_path):
    import torch

    good = tmp_path / "tiny.pt"
    torch.save({"model": None, "epoch": 1}, good)
    assert check_model_source(good) == str(good)
    assert check_model_source("yolo11n.yaml") == "yolo11n.yaml"
