"""Distillation: the KD term, soft labels that follow their boxes through augmentation, the distill stage."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from wanwu.distill import (
    SoftLabelDataset,
    SoftLabelDetectionLoss,
    SoftLabels,
    kd_term,
    pad_per_image,
    teacher_distribution,
)

# ---- the KD term ------------------------------------------------------------------------------------------


def test_kd_term_is_zero_when_distributions_agree_and_grows_as_they_part():
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(32, 16) * 2, dim=-1)
    agree = torch.log(teacher) + 5.0  # any shift of the logits is the same distribution
    assert kd_term(agree, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(32, 16) * 3
    values = [kd_term((1 - a) * agree + a * other, teacher, 3.0).item() for a in np.linspace(0, 1, 6)]
    assert all(b > a for a, b in itertools.pairwise(values)), values
    assert values[-1] > 0.1


def test_kd_term_gradient_pulls_the_student_towards_the_teacher():
    teacher = torch.tensor([[0.7, 0.2, 0.1]])
    logits = torch.zeros(1, 3, requires_grad=True)
    kd_term(logits, teacher, 3.0).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 2]  # descent raises class 0, lowers class 2


def test_teacher_distribution_drops_other_and_spreads_unlisted_mass():
    p = teacher_distribution([2, -1], [0.6, 0.2], label_id=2, nc=4)
    assert p.sum() == pytest.approx(1.0)
    assert p.argmax() == 2
    assert p[0] == pytest.approx(p[1]) == pytest.approx(p[3]) and p[0] > 0  # the unlisted 0.2, evenly
    assert teacher_distribution([-1], [1.0], label_id=1, nc=3).tolist() == [0.0, 1.0, 0.0]  # all "other" → one-hot
    assert teacher_distribution([], [], label_id=0, nc=2).tolist() == [1.0, 0.0]


def test_pad_per_image_lays_rows_out_like_the_targets():
    soft = torch.arange(5, dtype=torch.float32).view(5, 1)
    out = pad_per_image(soft, torch.tensor([0, 0, 2, 2, 2]), 3)
    assert out.shape == (3, 3, 1)
    assert out[0, :2, 0].tolist() == [0, 1] and out[1].abs().sum() == 0 and out[2, :, 0].tolist() == [2, 3, 4]


def _tiny_model(nc: int = 3):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo11n.yaml", nc=nc, verbose=False)
    model.args = get_cfg()
    return model


def test_kd_through_the_real_loss_class_zero_on_agreement_and_growing_with_disagreement():
    """Same class logits everywhere (uniform student): a uniform teacher gives 0, sharper teachers more."""
    torch.manual_seed(0)
    nc = 3
    model = _tiny_model(nc)
    head = model.model[-1]
    for seq in head.cv3:  # the class branch: constant logits so the student's distribution is uniform
        torch.nn.init.zeros_(seq[-1].weight)
        torch.nn.init.constant_(seq[-1].bias, -1.0)
    model.train()
    img = torch.rand(2, 3, 64, 64)
    preds = model(img)
    batch = {
        "img": img,
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.4, 0.4, 0.3, 0.3]]),
    }
    crit = SoftLabelDetectionLoss(model, temperature=3.0, alpha=1.0)
    kd = []
    for sharp in (0.0, 1.0, 3.0):
        logits = torch.tensor([[sharp, 0.0, 0.0], [0.0, 0.0, sharp]])
        batch["soft"] = torch.softmax(logits, -1)
        total, items = crit(preds, batch)
        assert total.shape == (4,) and "kd_loss" in items
        kd.append(items["kd_loss"].item())
    assert kd[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < kd[1] < kd[2]
    without = {k: v for k, v in batch.items() if k != "soft"}  # validation batches carry no soft labels
    assert crit(preds, without)[1]["kd_loss"].item() == 0.0


# ---- soft labels follow their boxes -----------------------------------------------------------------------
_NC = 12
_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
    (0, 0, 128),
    (128, 0, 0),
    (0, 128, 128),
]


def _colour_world(root: Path, n_images: int = 4, size: int = 128) -> tuple[Path, SoftLabels, dict[int, int]]:
    """Each box has its own class and colour; its soft label points at a *different* class (a permutation),
    so a soft row that drifted to another box would name the wrong colour."""
    rng = random.Random(0)
    img_dir, lbl_dir = root / "images" / "train", root / "labels" / "train"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    perm = list(range(_NC))
    rng.shuffle(perm)
    partner = {c: perm[c] for c in range(_NC)}
    soft = SoftLabels(nc=_NC)
    cls_iter = iter(range(_NC))
    for i in range(n_images):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        boxes, classes, lines = [], [], []
        for x0 in (4, 44, 84):  # three columns: boxes never overlap
            c = next(cls_iter)
            x1, y1 = x0 + rng.randint(0, 6), rng.randint(4, 60)
            x2, y2 = x1 + rng.randint(24, 34), y1 + rng.randint(24, 60)
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=_COLOURS[c])
            boxes.append((x1, y1, x2, y2))
            classes.append(c)
            lines.append(f"{c} {(x1 + x2) / 2 / size} {(y1 + y2) / 2 / size} {(x2 - x1) / size} {(y2 - y1) / size}")
        img.save(img_dir / f"im{i}.png")
        (lbl_dir / f"im{i}.txt").write_text("\n".join(lines) + "\n")
        dist = np.zeros((3, _NC), np.float32)
        dist[np.arange(3), [partner[c] for c in classes]] = 1.0
        order = [2, 0, 1]  # the table lists boxes in another order than the label file: matching is by IoU
        soft.by_image[f"im{i}"] = (
            np.array(boxes, np.float32)[order],
            np.array(classes)[order],
            dist[order],
        )
    return img_dir, soft, partner


def test_soft_labels_follow_their_boxes_through_mosaic_scale_translate_and_flips(tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset

    img_dir, soft, partner = _colour_world(tmp_path)
    back = {v: k for k, v in partner.items()}
    hyp = get_cfg(
        overrides={
            "mosaic": 1.0,
            "scale": 0.5,
            "translate": 0.2,
            "degrees": 0.0,
            "shear": 0.0,
            "perspective": 0.0,
            "fliplr": 0.5,
            "flipud": 0.5,
            "hsv_h": 0.0,
            "hsv_s": 0.0,
            "hsv_v": 0.0,
            "mixup": 0.0,
            "cutmix": 0.0,
        }
    )
    names = {i: f"c{i}" for i in range(_NC)}
    ds = YOLODataset(
        img_path=str(img_dir),
        imgsz=128,
        augment=True,
        hyp=hyp,
        data={"names": names, "nc": _NC},
        task="detect",
        batch_size=4,
    )
    stats = SoftLabelDataset.adopt(ds, soft)
    assert stats == {"boxes": 12, "matched": 12, "images_with_soft_labels": 4}
    palette = np.array(_COLOURS, np.float32)
    checked, seen_mosaic = 0, False
    random.seed(0)
    for _ in range(6):
        for i in range(len(ds)):
            item = ds[i]
            cls = item["cls"].numpy()
            assert cls.shape[1] == 1 + _NC
            img = item["img"].numpy().transpose(1, 2, 0).astype(np.float32)  # RGB, HWC
            h, w = img.shape[:2]
            seen_mosaic |= len(cls) > 3
            for row, (cx, cy, bw, bh) in zip(cls, item["bboxes"].numpy(), strict=True):
                if bw * w < 6 or bh * h < 6:
                    continue
                hard, soft_target = int(row[0]), int(row[1:].argmax())
                assert back[soft_target] == hard  # the soft row still sits beside its own box's class
                pixel = img[int(cy * h), int(cx * w)]
                assert np.linalg.norm(palette - pixel, axis=1).argmin() == back[soft_target]  # … and its own box
                checked += 1
    assert seen_mosaic and checked > 50


def test_soft_labels_from_the_labels_contract(tmp_path):
    import pandas as pd

    from wanwu import contracts

    df = pd.DataFrame(
        {
            "sha256": ["a", "a", "b"],
            "box_id": [0, 1, 0],
            "x1": [0.0, 50.0, 10.0],
            "y1": [0.0, 50.0, 10.0],
            "x2": [20.0, 90.0, 30.0],
            "y2": [20.0, 90.0, 30.0],
            "proposer": ["p"] * 3,
            "proposer_conf": [0.9] * 3,
            "topk_ids": [[1, 0], [2, -1], [0]],
            "topk_probs": [[0.8, 0.2], [0.5, 0.5], [1.0]],
            "label_id": [1, 2, 0],
            "confidence": [0.8, 0.5, 1.0],
            "origin": ["auto", "auto", "human"],
            "needs_review": [False] * 3,
            "source_label": [None] * 3,
        }
    )
    path = tmp_path / "soft_labels.parquet"
    contracts.write("labels", df, path)
    soft = SoftLabels.load(path, nc=3)
    rows, matched = soft.columns_for(
        "a", np.array([[51, 49, 90, 91], [0, 0, 20, 20], [200, 200, 210, 210]]), np.array([2, 1, 0])
    )
    assert matched == 2
    assert rows[0].tolist() == [0.0, 0.0, 1.0]  # "other" mass dropped
    assert rows[1] == pytest.approx([0.2, 0.8, 0.0])
    assert rows[2].tolist() == [1.0, 0.0, 0.0]  # no teacher row: one-hot on the hard label


# ---- the distill stage ------------------------------------------------------------------------------------
def _project(tmp_path: Path, monkeypatch) -> tuple:
    """A tiny project: the quality stage's dataset and soft labels, and a baseline checkpoint (untrained)."""
    import sys

    import pandas as pd

    from wanwu import contracts
    from wanwu.config import ProjectParams

    sys.path.insert(0, str(Path(__file__).parent))
    from _shapes import make_dataset

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("WANWU_ARTIFACT_ROOT", (tmp_path / "mlartifacts").as_uri())
    monkeypatch.delenv("WANWU_PARENT_RUN_ID", raising=False)
    data_dir = tmp_path / "data"
    ds = data_dir / "quality" / "dataset"
    make_dataset(ds, n_train=12, n_val=6, n_test=4)
    rows = []
    for f in sorted((ds / "labels" / "train").glob("*.txt")):
        for j, line in enumerate(f.read_text().splitlines()):
            c, cx, cy, w, h = (float(x) for x in line.split())
            s = 64
            rows.append(
                {
                    "sha256": f.stem,
                    "box_id": j,
                    "x1": (cx - w / 2) * s,
                    "y1": (cy - h / 2) * s,
                    "x2": (cx + w / 2) * s,
                    "y2": (cy + h / 2) * s,
                    "proposer": "p",
                    "proposer_conf": 0.9,
                    "topk_ids": [int(c), (int(c) + 1) % 3, -1],
                    "topk_probs": [0.6, 0.3, 0.1],
                    "label_id": int(c),
                    "confidence": 0.6,
                    "origin": "auto",
                    "needs_review": False,
                    "source_label": None,
                }
            )
    contracts.write("labels", pd.DataFrame(rows), data_dir / "quality" / "soft_labels.parquet")
    baseline = data_dir / "train" / "best.pt"
    baseline.parent.mkdir(parents=True)
    model = _tiny_model(3)
    model.names = {0: "猫", 1: "狗", 2: "鸟"}
    torch.save({"model": model.half(), "train_args": {}}, baseline)
    return ProjectParams(data_dir=data_dir, seed=0), data_dir


def _runs(stage: str):
    import mlflow

    return mlflow.search_runs(experiment_names=["wanwu"], filter_string=f"tags.`wanwu.stage` = '{stage}'")


@pytest.mark.slow
def test_mlflow_distill_one_epoch_with_soft_labels_logs_the_kd_loss(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ultralytics import YOLO

    from tasks.distill import run
    from wanwu.config import DistillParams

    project, _ = _project(tmp_path, monkeypatch)
    params = DistillParams(epochs=1, imgsz=64, batch=6, cache=False, mode="soft")
    result = run(params, project)
    assert Path(result.best).is_file() and result.soft_boxes_matched == result.soft_boxes > 0
    runs = _runs("distill")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    client = MlflowClient()
    kd = client.get_metric_history(runs.iloc[0]["run_id"], "train/kd_loss")
    assert kd and all(m.value > 0 for m in kd)
    # the checkpoint is a plain ultralytics model: no wanwu class inside
    ckpt = torch.load(result.best, map_location="cpu", weights_only=False)
    assert type(ckpt["model"]).__name__ == "DetectionModel" and type(ckpt["model"]).__module__.startswith("ultralytics")
    assert YOLO(result.best).names[0] == "猫"


@pytest.mark.slow
def test_mlflow_distill_feature_mode_uses_ultralytics_distill_model(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tasks.distill import run
    from wanwu.config import DistillParams

    project, data_dir = _project(tmp_path, monkeypatch)
    teacher = data_dir / "train" / "best.pt"  # any detector checkpoint will do as the teacher here
    params = DistillParams(epochs=1, imgsz=64, batch=6, cache=False, mode="both", teacher_model=str(teacher))
    result = run(params, project)
    assert result.teacher == str(teacher.resolve())
    history = MlflowClient().get_metric_history(_runs("distill").iloc[0]["run_id"], "train/dis_loss")
    assert history and history[-1].value > 0
    ckpt = torch.load(result.best, map_location="cpu", weights_only=False)
    assert type(ckpt["model"]).__name__ == "DetectionModel"  # the student alone, the teacher left out
    assert yaml.safe_load((data_dir / "distill" / "run" / "args.yaml").read_text())["distill_model"] == str(
        teacher.resolve()
    )
