"""The proposer adapter: boxes in image pixels from any ultralytics detector, batched, class-aware through the
ontology or class-agnostic; where its weights come from (a file, the registry's champion, trained here)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from wanwu.models import proposer as pz


@pytest.fixture(scope="module")
def detector(tmp_path_factory, ontology):
    """An untrained YOLO11n in ultralytics' checkpoint format, with the proposer's class names (ontology + 物体)."""
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("det") / "det.pt"
    names = {**ontology.names_zh, len(ontology): pz.OBJECT_NAME}
    y = YOLO("yolo11n.yaml")
    from ultralytics.nn.tasks import DetectionModel

    y.model = DetectionModel("yolo11n.yaml", nc=len(names), verbose=False)
    y.model.names = names
    y.ckpt = {"train_args": {"imgsz": 64, "task": "detect"}}  # what a trained checkpoint carries
    y.save(path)
    return path


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (48, 96), (100, 70))
    ]


def test_boxes_are_in_image_pixels_batched_like_one_by_one(detector, ontology):
    p = pz.Proposer(detector, ontology, imgsz=64, conf=0.0, max_det=20, batch_size=8, device="cpu")
    ims = images()
    batched = p.propose(ims)
    assert p.calls == 1 and p.images == 3
    one = [p.propose([im])[0] for im in ims]
    assert p.calls == 4
    for b, o, im in zip(batched, one, ims, strict=True):
        assert 0 < len(b) <= 20
        w, h = im.size
        assert (b.xyxy[:, [0, 2]] >= 0).all() and (b.xyxy[:, [0, 2]] <= w).all()
        assert (b.xyxy[:, [1, 3]] >= 0).all() and (b.xyxy[:, [1, 3]] <= h).all()
        assert (b.xyxy[:, 2] > b.xyxy[:, 0]).all() and (b.xyxy[:, 3] > b.xyxy[:, 1]).all()
        assert np.all(np.diff(b.conf) <= 0)  # best first
        np.testing.assert_allclose(b.xyxy, o.xyxy, atol=0.05)
        np.testing.assert_allclose(b.conf, o.conf, atol=1e-4)
        assert set(b.label.tolist()) <= set(range(len(ontology))) | {-1}


def test_class_names_map_through_the_ontology_and_agnostic_mode(detector, ontology):
    aware = pz.Proposer(detector, ontology, device="cpu")
    assert aware.class_map.tolist() == [*range(len(ontology)), -1]  # 物体 is no class: other
    assert aware.imgsz == 64  # from the checkpoint's training args
    agnostic = pz.Proposer(detector, ontology, class_aware=False, conf=0.0, device="cpu")
    assert (agnostic.class_map == -1).all()
    assert all((r.label == -1).all() for r in agnostic.propose(images()))
    assert aware.version() != agnostic.version()  # the cache key sees every knob
    assert aware.version() == pz.Proposer(detector, ontology, device="cpu").version()


def test_letterbox_round_trip():
    im = np.zeros((50, 100, 3), np.uint8)
    x, metas = pz.letterbox_batch([im], 64)
    assert x.shape == (1, 3, 64, 64)
    r, px, py = metas[0]
    assert r == pytest.approx(0.64) and px == 0 and py == 16
    assert x[0, :, :16].max() == pytest.approx(114 / 255)  # grey padding above


def test_build_dataset_generic_boxes_become_object_and_seed_boxes_keep_their_class(tmp_path, ontology):
    g = tmp_path / "generic"
    for split in ("train", "val"):
        (g / "images" / split).mkdir(parents=True)
        (g / "labels" / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64)).save(g / "images" / split / f"{i:06d}.png")
            (g / "labels" / split / f"{i:06d}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (g / "data.yaml").write_text(
        yaml.safe_dump({"path": str(g), "train": "images/train", "val": "images/val", "names": {0: "object"}})
    )
    seed_img = tmp_path / "seed.jpg"
    Image.new("RGB", (100, 50)).save(seed_img)
    seed = [(seed_img, 100, 50, [(3, 10.0, 10.0, 30.0, 20.0), (-1, 50.0, 5.0, 60.0, 45.0)])]
    data_yaml = pz.build_dataset(g / "data.yaml", seed, tmp_path / "ds", ontology, seed_repeat=2)
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    assert data["names"][0] == "猫" and data["names"][len(ontology)] == pz.OBJECT_NAME
    k = len(ontology)
    assert (tmp_path / "ds" / "labels" / "train" / "g_000000.txt").read_text().split()[0] == str(k)
    lines = (tmp_path / "ds" / "labels" / "train" / "s1_seed.txt").read_text().splitlines()
    assert lines[0].split() == ["3", "0.200000", "0.300000", "0.200000", "0.200000"]
    assert lines[1].split()[0] == str(k)  # a seed box of no class: object
    assert len(list((tmp_path / "ds" / "images" / "train").glob("s*_seed.jpg"))) == 2
    agnostic = pz.build_dataset(g / "data.yaml", seed, tmp_path / "ds2", ontology, class_aware=False)
    assert yaml.safe_load(agnostic.read_text(encoding="utf-8"))["names"] == {0: pz.OBJECT_NAME}
    with pytest.raises(pz.ProposerError, match="no training images"):
        pz.build_dataset(None, [], tmp_path / "ds3", ontology)


def test_champion_from_the_registry(tmp_path, detector):
    """The registry's champion alias resolves to its PyTorch checkpoint; no model or no champion → None.

    Uses the test session's MLflow store (conftest) under a model name of its own.
    """
    import mlflow

    from wanwu.offline import tracking_uri

    name = f"wanwu-proposer-test-{tmp_path.name}"
    mlflow.set_tracking_uri(tracking_uri(tmp_path))
    assert pz.champion_checkpoint(tmp_path, tmp_path / "c", model_name=name) is None  # no such model
    exp = mlflow.create_experiment(name, artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifact(str(detector), artifact_path="weights")
    client = mlflow.MlflowClient()
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/weights", run.info.run_id)
    assert pz.champion_checkpoint(tmp_path, tmp_path / "c", model_name=name) is None  # no alias yet
    client.set_registered_model_alias(name, "champion", mv.version)
    got = pz.champion_checkpoint(tmp_path, tmp_path / "c", model_name=name)
    assert got is not None and got.name == "det.pt" and got.read_bytes() == detector.read_bytes()


def test_test_time_augmentation_is_a_knob_of_the_boxes_and_of_the_cache_key(detector, ontology):
    """ultralytics' flip-and-scale TTA runs through the same batching and pixel mapping; it changes the cache key,
    and leaving it off keeps the keys of projects labeled before the knob existed."""
    from wanwu.labeling import ProposerSpec

    plain = pz.Proposer(detector, ontology, imgsz=64, conf=0.0, max_det=50, device="cpu")
    tta = pz.Proposer(detector, ontology, imgsz=64, conf=0.0, max_det=50, device="cpu", augment=True)
    ims = images()
    for a, b, im in zip(plain.propose(ims), tta.propose(ims), ims, strict=True):
        w, h = im.size
        assert 0 < len(b) <= 50 and (b.xyxy[:, [0, 2]] <= w).all() and (b.xyxy[:, [1, 3]] <= h).all()
        assert len(a) != len(b) or not np.allclose(a.conf, b.conf)  # the flipped and scaled passes add their boxes
    assert tta.calls == plain.calls == 1
    assert tta.version() != plain.version()
    assert "augment" not in ProposerSpec(weights=str(detector)).model_dump()
    assert ProposerSpec(weights=str(detector), augment=True).model_dump()["augment"] is True
