"""Bad input beyond collect: each gets a clear error naming the file and the fix (issue 9's corpus).

Malformed params and ontologies with duplicate names are covered in test_config.py / test_ontology.py; label
files pointing at missing images and COCO ids that do not match in test_sources.py. Here: model files.
"""

from __future__ import annotations

import zipfile

import pytest

from wanwu.checkpoints import CheckpointError, check_model_source


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
