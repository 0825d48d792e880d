"""A tiny, easy detection world for the evaluate / export / registry tests and the export bench.

Coloured shapes on light backgrounds, one class per shape and colour, so a YOLO11n built from yaml learns it in
a few epochs at imgsz 64 on two CPU cores. ``shifted=True`` draws the same classes small, over dark noise:
newly labeled data from another distribution, on which a model trained here does clearly worse (the rollback
scenario). Class ids and names are the project ontology's first classes, as in the quality stage's data.yaml.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

# ontology ids 0..2: 猫 cat, 狗 dog, 鸟 bird (names as the quality stage writes them: Chinese)
NAMES = {0: "猫", 1: "狗", 2: "鸟"}
_COLOURS = {0: (220, 30, 30), 1: (30, 60, 220), 2: (20, 160, 40)}


def _draw(draw: ImageDraw.ImageDraw, cls: int, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    colour = _COLOURS[cls]
    if cls == 0:
        draw.rectangle(box, fill=colour)
    elif cls == 1:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)


def make_image(rng: random.Random, size: int = 64, shifted: bool = False) -> tuple[Image.Image, list[tuple]]:
    """One scene and its YOLO labels (cls, cx, cy, w, h normalised)."""
    if shifted:
        noise = np.random.default_rng(rng.randrange(2**31)).integers(0, 90, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(noise)
    else:
        img = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    labels = []
    n = rng.randint(1, 2)
    slots = [(0, 0, size // 2, size), (size // 2, 0, size, size)] if n == 2 else [(0, 0, size, size)]
    for sx1, sy1, sx2, sy2 in slots:
        cls = rng.randrange(len(NAMES))
        lo, hi = (6, 10) if shifted else (size // 4, min(sx2 - sx1, sy2 - sy1) - 4)
        side = rng.randint(lo, max(lo, hi))
        x1 = rng.randint(sx1, max(sx1, sx2 - side - 1))
        y1 = rng.randint(sy1, max(sy1, sy2 - side - 1))
        box = (x1, y1, x1 + side, y1 + side)
        _draw(draw, cls, box)
        labels.append((cls, (x1 + side / 2) / size, (y1 + side / 2) / size, side / size, side / size))
    return img, labels


def make_dataset(
    root: str | Path,
    n_train: int = 48,
    n_val: int = 16,
    n_test: int = 16,
    seed: int = 0,
    shifted: bool = False,
    size: int = 64,
) -> Path:
    """Write a YOLO dataset (images/labels × train/val/test) and its data.yaml; return the data.yaml path."""
    root = Path(root)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = make_image(rng, size, shifted)
            img.save(root / "images" / split / f"{split}{i:04d}.jpg", quality=95)
            (root / "labels" / split / f"{split}{i:04d}.txt").write_text(
                "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in labels)
            )
    data = {
        "path": str(root.resolve()),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": NAMES,
    }
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out


def _drop_mlflow_callbacks(trainer) -> None:
    """This training is a fixture, not an experiment: keep ultralytics' MLflow callback out of every store."""
    for event, fns in trainer.callbacks.items():
        trainer.callbacks[event] = [f for f in fns if "callbacks.mlflow" not in getattr(f, "__module__", "")]


def trained_checkpoints(cache_dir: str | Path, epochs: int = 60) -> dict[str, Path]:
    """One real training run on the shapes world (YOLO11n from yaml, imgsz 64, 40-75 s on two cores).

    Returns checkpoints of increasing quality from the same run: ``weak`` (epoch 24), ``good`` (epoch 30) and
    ``best`` (the end), plus the data.yaml of the shapes world and of its shifted twin. Built once per cache
    folder, process-safe, so several test files of one session share it.

    60 epochs, not 36: the run only takes off after ~20 epochs and where depends on the CPU's float kernels. On
    one machine 36 epochs ended at mAP50-95 0.34 with no box above conf 0.27 (the export and registry tests then
    found nothing to compare); 60 epochs there: epoch 24 0.14, epoch 30 0.35, the end 0.73.
    """
    from filelock import FileLock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "weak": cache_dir / "weak.pt",
        "good": cache_dir / "good.pt",
        "best": cache_dir / "best.pt",
        "data": cache_dir / "shapes" / "data.yaml",
        "shifted": cache_dir / "shifted" / "data.yaml",
    }
    with FileLock(str(cache_dir / ".lock")):
        if all(p.is_file() for p in out.values()):
            return out
        make_dataset(cache_dir / "shapes", n_train=64)
        make_dataset(cache_dir / "shifted", shifted=True, seed=1)
        from ultralytics import YOLO

        model = YOLO("yolo11n.yaml")
        model.add_callback("on_pretrain_routine_start", _drop_mlflow_callbacks)
        model.train(
            data=str(out["data"]),
            epochs=epochs,
            imgsz=64,
            batch=16,
            seed=0,
            deterministic=True,
            mosaic=0.0,
            close_mosaic=0,
            warmup_epochs=0,
            lr0=0.02,
            optimizer="SGD",
            val=False,
            plots=False,
            workers=0,
            device="cpu",
            save_period=6,
            project=str(cache_dir),
            name="run",
            exist_ok=True,
            verbose=False,
        )
        weights = cache_dir / "run" / "weights"
        import shutil

        from ultralytics.utils.torch_utils import strip_optimizer

        for key, name in (("weak", "epoch24.pt"), ("good", "epoch30.pt"), ("best", "last.pt")):
            shutil.copyfile(weights / name, out[key])
            strip_optimizer(str(out[key]))  # as ultralytics does for best.pt: weights only, a third of the size
    return out


def mlflow_store(cache_dir: str | Path) -> str:
    """A SQLite MLflow store created once per cache folder (creating its tables takes seconds); returns its URI."""
    from filelock import FileLock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    db = cache_dir / "mlflow.db"
    uri = f"sqlite:///{db}"
    with FileLock(str(cache_dir / ".lock")):
        if not db.is_file():
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def make_project(root: str | Path, data_yaml: str | Path, candidates: dict[str, Path], ontology: Path) -> Path:
    """A project folder as the stages see it: params.yaml, data/quality/dataset (a copy of ``data_yaml``'s
    dataset) and the candidates at data/<stage>/best.pt. Returns the project root."""
    import shutil

    root = Path(root)
    src = Path(data_yaml).parent
    dst = root / "data" / "quality" / "dataset"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.cache"))
    data = yaml.safe_load((src / "data.yaml").read_text(encoding="utf-8"))
    data["path"] = str(dst.resolve())
    (dst / "data.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    for stage, weights in candidates.items():
        (root / "data" / stage).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, root / "data" / stage / "best.pt")
    (root / "params.yaml").write_text(f"project:\n  data_dir: data\n  ontology: {ontology}\n", encoding="utf-8")
    return root
