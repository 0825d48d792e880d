"""The proposer: an ultralytics detector that says *where* things are; the teachers say *what* they are.

Any ultralytics detection checkpoint works (class-aware: its class names are looked up in the ontology, names
that map to nothing become "other"; or class-agnostic: every box is just a box). Where the weights come from
(:func:`resolve`): a checkpoint path, a model yaml (trained here), the registry's ``champion`` alias, or
``auto`` — a detector trained here (:func:`train_proposer`, cached by its inputs) on what a real deployment
has: a generic detection corpus (the sample world's, standing in for COCO) plus the human-labeled seed.

Inference bypasses ultralytics' predictor: images are letterboxed and stacked into one tensor, one forward
pass per batch, ultralytics' own NMS. That is what makes batching pay, and it is thread-safe per call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wanwu.ontology import OTHER_ID, Ontology, normalize_name

log = logging.getLogger(__name__)

OBJECT_NAME = "物体"
"""Name of the proposer's extra class: any object that is no ontology class (generic corpus boxes)."""


class ProposerError(RuntimeError):
    """The proposer cannot be resolved, loaded or trained; the message names the file or key and the fix."""


@dataclass
class Proposals:
    """Boxes of one image, in pixels of that image, best first."""

    xyxy: np.ndarray  # (n, 4) float32
    conf: np.ndarray  # (n,) float32
    label: np.ndarray  # (n,) int32: ontology id, or -1 (other / class-agnostic)

    def __len__(self) -> int:
        return len(self.conf)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def name_index(ontology: Ontology) -> dict[str, int]:
    """Normalized name → id without the fuzzy suggestions of ``Ontology.lookup`` (fast for 50k labels)."""
    return {normalize_name(n): c.id for c in ontology.classes for n in c.names}


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return "cpu" if device == "cpu" else (f"cuda:{device}" if device.isdigit() else device)
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def letterbox_batch(images: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """RGB uint8 HWC images → (B, 3, size, size) float32 in 0..1, grey-padded, plus (ratio, pad_x, pad_y) each."""
    import cv2

    out = np.full((len(images), size, size, 3), 114, np.uint8)
    metas = []
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        r = min(size / h, size / w)
        nh, nw = max(1, round(h * r)), max(1, round(w * r))
        if (nh, nw) != (h, w):
            im = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_LINEAR)
        py, px = (size - nh) // 2, (size - nw) // 2
        out[i, py : py + nh, px : px + nw] = im
        metas.append((r, float(px), float(py)))
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, metas


class Proposer:
    """An ultralytics detector behind ``propose(images) -> list[Proposals]``, batched, counting its calls."""

    def __init__(
        self,
        weights: str | Path,
        ontology: Ontology,
        *,
        imgsz: int | None = None,
        conf: float = 0.1,
        iou: float = 0.6,
        max_det: int = 100,
        class_aware: bool = True,
        device: str = "auto",
        batch_size: int = 16,
        augment: bool = False,
    ):
        import torch

        from wanwu.checkpoints import CheckpointError, load_ultralytics

        self.weights = Path(weights)
        if not self.weights.is_file():
            raise ProposerError(f"{self.weights}: proposer checkpoint not found. Set autolabel.proposer to a .pt file.")
        self.device = resolve_device(device)
        try:
            model, ckpt = load_ultralytics(self.weights, "autolabel.proposer", device=self.device)
        except CheckpointError as e:
            raise ProposerError(str(e)) from e
        task = getattr(model, "task", "detect")
        if task != "detect":
            raise ProposerError(f"{self.weights}: a {task} checkpoint, not a detector. Give a detection checkpoint.")
        # channels-last runs the convolutions about 1.8x faster on the CPU (oneDNN's preferred layout)
        self.model = model.float().eval().to(memory_format=torch.channels_last)
        self.names: dict[int, str] = dict(model.names)
        train_imgsz = (ckpt.get("train_args") or {}).get("imgsz") or model.args.get("imgsz", 640)
        self.imgsz = int(imgsz or (train_imgsz if isinstance(train_imgsz, int) else max(train_imgsz)))
        self.stride = int(max(model.stride)) if hasattr(model, "stride") else 32
        self.imgsz = max(self.stride, int(np.ceil(self.imgsz / self.stride) * self.stride))
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.class_aware = class_aware
        self.augment = augment  # ultralytics' flip-and-scale TTA (DetectionModel._predict_augment)
        self.batch_size = max(1, batch_size)
        index = name_index(ontology)
        self.class_map = np.array(
            [
                index.get(normalize_name(self.names[i]), OTHER_ID) if class_aware else OTHER_ID
                for i in range(len(self.names))
            ],
            dtype=np.int32,
        )
        self.calls = 0
        self.images = 0
        self._lock = threading.Lock()
        self._version: str | None = None

    def version(self) -> str:
        """Content hash of the weights and every knob that changes the boxes: the labeling cache key."""
        if self._version is None:
            knobs = {
                "imgsz": self.imgsz,
                "conf": self.conf,
                "iou": self.iou,
                "max_det": self.max_det,
                "class_aware": self.class_aware,
                "augment": self.augment,
            }
            h = hashlib.sha256(file_sha256(self.weights).encode())
            h.update(json.dumps(knobs, sort_keys=True).encode())
            self._version = h.hexdigest()[:16]
        return self._version

    def propose(self, images: Sequence[Any]) -> list[Proposals]:
        """Boxes for each image (PIL or RGB uint8 arrays), ``batch_size`` images per forward pass."""
        import torch
        from ultralytics.utils import nms

        arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        out: list[Proposals] = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            x, metas = letterbox_batch(chunk, self.imgsz)
            with self._lock, torch.inference_mode():
                x = torch.from_numpy(x).to(self.device).contiguous(memory_format=torch.channels_last)
                preds = self.model(x, augment=True) if self.augment else self.model(x)
                dets = nms.non_max_suppression(
                    preds,
                    self.conf,
                    self.iou,
                    None,
                    True,
                    max_det=self.max_det,
                    nc=len(self.names),
                    end2end=bool(getattr(self.model, "end2end", False)),
                )
                self.calls += 1
                self.images += len(chunk)
            for det, im, (r, px, py) in zip(dets, chunk, metas, strict=True):
                d = det.cpu().numpy()
                h, w = im.shape[:2]
                xyxy = d[:, :4].copy()
                xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - px) / r).clip(0, w)
                xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - py) / r).clip(0, h)
                keep = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
                xyxy, conf, cls = xyxy[keep], d[keep, 4], d[keep, 5].astype(np.int64)
                # deterministic order: confidence, then position (ties do happen with quantized scores)
                order = np.lexsort((xyxy[:, 1], xyxy[:, 0], -conf))
                out.append(
                    Proposals(
                        xyxy=np.round(xyxy[order], 2).astype(np.float32),
                        conf=conf[order].astype(np.float32),
                        label=self.class_map[cls[order]] if len(cls) else np.zeros(0, np.int32),
                    )
                )
        return out


# ---- where the weights come from ---------------------------------------------------------------------------


def champion_checkpoint(
    root: Path, out_dir: Path, model_name: str = "wanwu-detector", alias: str = "champion"
) -> Path | None:
    """The registry's champion as a PyTorch checkpoint, or None when there is no registry, champion or .pt file.

    The registered version's artifacts are downloaded (a local copy for a local store) into ``out_dir`` and the
    first ``*.pt`` file among them is used: the proposer needs PyTorch weights, not the exported ONNX.
    """
    from wanwu.offline import tracking_uri

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # no store yet: nothing was ever registered (and importing mlflow costs seconds)
    try:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        version = client.get_model_version_by_alias(model_name, alias)
    except Exception as e:  # no such model or alias: a first run
        log.info("no %s@%s in the registry (%s)", model_name, alias, e)
        return None
    target = out_dir / f"v{version.version}"
    if not target.is_dir():
        tmp = out_dir / f".v{version.version}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp))
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("could not fetch the artifacts of %s v%s: %s", model_name, version.version, e)
            return None
        os.replace(tmp, target)
    found = sorted(target.rglob("*.pt"))
    return found[0] if found else None


def build_dataset(
    generic_yaml: Path | None,
    seed: list[tuple[Path, int, int, list[tuple[int, float, float, float, float]]]],
    out_dir: Path,
    ontology: Ontology,
    *,
    generic_train: int | None = None,
    generic_val: int | None = 40,
    seed_repeat: int = 1,
    class_aware: bool = True,
) -> Path:
    """A YOLO dataset under ``out_dir``: generic corpus boxes as class ``物体`` plus the seed's human boxes.

    Class-aware: ids 0..K-1 are the ontology (Chinese names), id K is ``物体`` (any other object), so the
    student can start from these weights with the same ids. Class-agnostic: one class ``物体``. ``seed`` holds
    (image path, width, height, [(label_id, x1, y1, x2, y2), ...]); seed images are repeated ``seed_repeat``
    times per epoch because they are few and the only ones with ontology classes. Files are hard-linked.
    """
    import yaml

    k = len(ontology)
    obj_id = k if class_aware else 0
    names = {**({c.id: c.zh for c in ontology.classes} if class_aware else {}), obj_id: OBJECT_NAME}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for split in ("train", "val"):
        (out_dir / "images" / split).mkdir(parents=True)
        (out_dir / "labels" / split).mkdir(parents=True)

    def link(src: Path, dst: Path) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)

    counts = {"generic_train": 0, "generic_val": 0, "seed": 0}
    if generic_yaml is not None:
        g = yaml.safe_load(Path(generic_yaml).read_text(encoding="utf-8"))
        groot = Path(g.get("path") or Path(generic_yaml).parent)
        if not groot.is_absolute():
            groot = Path(generic_yaml).parent / groot
        for split, cap in (("train", generic_train), ("val", generic_val)):
            imgs = sorted((groot / g[split]).glob("*.*"))
            imgs = imgs[:cap] if cap is not None else imgs
            for img in imgs:
                lbl = (
                    Path(str(img.parent).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"))
                    / f"{img.stem}.txt"
                )
                lines = []
                if lbl.is_file():
                    for line in lbl.read_text().splitlines():
                        parts = line.split()
                        if len(parts) == 5:
                            lines.append(f"{obj_id} {' '.join(parts[1:])}")
                dst = out_dir / "images" / split / f"g_{img.name}"
                link(img, dst)
                (out_dir / "labels" / split / f"g_{img.stem}.txt").write_text("".join(x + "\n" for x in lines))
                counts[f"generic_{split}"] += 1
    for path, w, h, boxes in seed:
        lines = []
        for label_id, x1, y1, x2, y2 in boxes:
            cls = label_id if (class_aware and label_id >= 0) else obj_id
            lines.append(
                f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            )
        for r in range(max(1, seed_repeat)):
            stem = f"s{r}_{Path(path).stem}"
            link(Path(path), out_dir / "images" / "train" / f"{stem}{Path(path).suffix}")
            (out_dir / "labels" / "train" / f"{stem}.txt").write_text("".join(x + "\n" for x in lines))
        counts["seed"] += 1
    if counts["generic_train"] + counts["seed"] == 0:
        raise ProposerError(
            f"{out_dir}: no training images for the proposer (no generic corpus and no seed images). Collect a "
            "labeled seed (collect.sources with role seed) or set autolabel.proposer to a detector checkpoint."
        )
    if counts["generic_val"] == 0:  # ultralytics needs a val split: fall back to the seed images
        for f in sorted((out_dir / "images" / "train").glob("s0_*"))[:20]:
            link(f, out_dir / "images" / "val" / f.name)
            shutil.copyfile(
                out_dir / "labels" / "train" / f"{f.stem}.txt", out_dir / "labels" / "val" / f"{f.stem}.txt"
            )
    data = {"path": str(out_dir.resolve()), "train": "images/train", "val": "images/val", "names": names}
    data_yaml = out_dir / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (out_dir / "counts.json").write_text(json.dumps(counts))
    return data_yaml


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able inputs (file lists, params): decides whether a trained artefact is stale."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_proposer(
    data_yaml: Path,
    out_dir: Path,
    model: str = "yolo11n.yaml",
    device: str = "auto",
    **ultralytics_args: Any,
) -> Path:
    """Train the proposer with the train stage's own helper (:func:`wanwu.training.fit`: resume, progress, MLflow)."""
    from wanwu.training import fit

    return fit(data_yaml, out_dir, model=model, device=device, progress="proposer", **ultralytics_args).best
