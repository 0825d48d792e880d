"""Knowledge distillation from the teacher's soft labels, by subclassing ultralytics (not forking it).

The teacher (the fused recognizers of the autolabel stage) gave every box a probability distribution over the
ontology. The student learns it through one extra loss term on its classification branch:

    total = detection loss (box + cls + dfl, unchanged) + alpha · T² · KL(p_T ‖ q_T)

- **Which anchors.** The term is taken on the anchors ultralytics' task-aligned assigner gives each box
  (``fg_mask`` and ``target_gt_idx``): the same anchors the hard-label BCE trains as that box's positives.
- **The student's distribution.** YOLO's class branch is one sigmoid per class, not a softmax. On an assigned
  anchor we take the softmax of its class logits, ``q_T = softmax(z / T)``. A softmax ignores a shift shared by all
  logits, which is exactly the "is there an object here" level that the sigmoid BCE keeps training, so the KD term
  shapes *which* class the anchor prefers without fighting the detection loss over *how confident* it is.
- **The teacher's distribution.** The teacher gives probabilities, not logits, so ``T`` is applied to their logs:
  ``p_T = softmax(log p / T)`` (``T > 1`` softens, as Hinton et al. do with logits). ``T²`` keeps the gradient
  scale independent of ``T``.
- **The hard-label cls loss is kept at full weight** (no ``1 - alpha``): it is also the only thing that teaches
  background anchors to stay low, which KD on assigned anchors cannot do.

How soft labels follow their boxes through mosaic, random perspective, flips, mixup and copy-paste: the dataset
carries them as extra columns of ``cls`` (``[class, p_0 … p_{C-1}]``). Every ultralytics transform moves, drops or
concatenates ``cls`` rows together with their boxes, so the columns go wherever the box goes;
:meth:`SoftLabelTrainer.preprocess_batch` splits them off again into ``batch["soft"]``. Checkpoints are written as
plain ultralytics ``DetectionModel`` s, so every later stage loads them with ``YOLO(path)`` and nothing of wanwu.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.data.dataset import YOLODataset
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG, RANK
from ultralytics.utils.loss import E2ELoss, v8DetectionLoss

log = logging.getLogger(__name__)

EPS = 1e-8
MATCH_IOU = 0.5  # a dataset box takes the soft label of the table row it overlaps at least this much


class DistillError(RuntimeError):
    """Soft labels cannot be used as given; the message names the file and the fix."""


# ---- the KD term ------------------------------------------------------------------------------------------
def kd_term(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """``T² · KL(p_T ‖ q_T)`` averaged over rows: ``p_T = softmax(log p / T)``, ``q_T = softmax(z / T)``.

    Zero exactly when ``softmax(z)`` equals ``p``; grows as they part. ``student_logits`` (n, C) are raw class
    logits, ``teacher_probs`` (n, C) probabilities (rows need not be normalised, zeros are floored at 1e-8).
    """
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_p = F.log_softmax(torch.log(teacher_probs.float().clamp_min(EPS)) / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * t * t


def pad_per_image(values: torch.Tensor, batch_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, C) rows of a batch → (B, n_max, C) laid out like ``v8DetectionLoss.preprocess`` lays out the targets."""
    n, c = values.shape
    if n == 0:
        return values.new_zeros(batch_size, 0, c)
    bi = batch_idx.long().view(-1)
    counts = torch.bincount(bi, minlength=batch_size)
    out = values.new_zeros(batch_size, int(counts.max()), c)
    offsets = torch.zeros(batch_size + 1, dtype=torch.long, device=values.device)
    offsets[1:] = counts.cumsum(0)
    within = torch.arange(n, device=values.device) - offsets[bi]
    out[bi, within] = values
    return out


class SoftLabelDetectionLoss(v8DetectionLoss):
    """ultralytics' detection loss plus ``alpha · T² · KL`` on the anchors assigned to each box (item ``kd_loss``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tal_topk: int = 10,
        tal_topk2: int | None = None,
        *,
        temperature: float = 3.0,
        alpha: float = 0.7,
    ):
        super().__init__(model, tal_topk, tal_topk2)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.loss_names = (*self.loss_names, "kd_loss")

    def loss(self, preds: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        batch_size = preds["boxes"].shape[0]
        assigned, loss, items = self.get_assigned_targets_and_loss(preds, batch)
        fg_mask, target_gt_idx = assigned[0], assigned[1]
        kd = self.alpha * self.kd_loss(preds["scores"], batch, fg_mask, target_gt_idx)
        return torch.cat([loss, kd.view(1).to(loss.dtype)]) * batch_size, {**items, "kd_loss": kd.detach()}

    def kd_loss(
        self, scores: torch.Tensor, batch: dict[str, torch.Tensor], fg_mask: torch.Tensor, target_gt_idx: torch.Tensor
    ) -> torch.Tensor:
        """The KD term (without alpha); zero for batches without soft labels (validation) or without positives."""
        soft = batch.get("soft")
        if soft is None or soft.numel() == 0 or not bool(fg_mask.any()):
            return torch.zeros((), device=scores.device)
        soft = soft.to(scores.device)
        padded = pad_per_image(soft, batch["batch_idx"].to(scores.device), scores.shape[0])
        b, a = fg_mask.nonzero(as_tuple=True)
        teacher = padded[b, target_gt_idx[b, a]]
        student = scores.permute(0, 2, 1)[b, a]  # (n_fg, nc) raw class logits
        return kd_term(student, teacher, self.temperature)


class KDDetectionModel(DetectionModel):
    """A DetectionModel whose criterion is :class:`SoftLabelDetectionLoss` (saved as a plain DetectionModel)."""

    kd_temperature: float = 3.0
    kd_alpha: float = 0.7

    def init_criterion(self):
        loss_fn = functools.partial(SoftLabelDetectionLoss, temperature=self.kd_temperature, alpha=self.kd_alpha)
        if getattr(self.model[-1], "one2one_cv2", None) is not None:  # end-to-end heads (YOLO26)
            return E2ELoss(self, loss_fn)
        return loss_fn(self)


# ---- soft labels from the labels contract -----------------------------------------------------------------
def teacher_distribution(topk_ids: Any, topk_probs: Any, label_id: int, nc: int) -> np.ndarray:
    """The teacher's top-k over ontology ids → a distribution over the ``nc`` dataset classes.

    Mass the top-k did not list is spread evenly over the classes it did not name; mass on "other" (-1) has no
    student class and is dropped before renormalising. A top-k naming no ontology class at all says nothing
    about the classes: the box then gets one-hot on ``label_id`` (its label in the dataset).
    """
    p = np.zeros(nc, np.float64)
    ids = np.asarray(topk_ids if topk_ids is not None else [], dtype=np.int64).ravel()
    probs = np.asarray(topk_probs if topk_probs is not None else [], dtype=np.float64).ravel()
    k = min(len(ids), len(probs))
    ids, probs = ids[:k], np.clip(np.nan_to_num(probs[:k]), 0.0, None)
    ok = (ids >= 0) & (ids < nc)
    np.add.at(p, ids[ok], probs[ok])
    residual = 1.0 - probs.sum()
    unseen = p == 0
    if p.sum() > 1e-12 and residual > 1e-6 and unseen.any():
        p[unseen] += residual / unseen.sum()
    if p.sum() <= 1e-12:
        p[:] = 0.0
        if 0 <= label_id < nc:
            p[label_id] = 1.0
        else:
            p[:] = 1.0 / nc
    return (p / p.sum()).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (n, 4) and (m, 4) xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


@dataclass
class SoftLabels:
    """Per image (sha256 = image file stem): boxes in pixels, label ids and teacher distributions over ``nc``."""

    nc: int
    by_image: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, df: Any, nc: int) -> SoftLabels:
        need = {"sha256", "x1", "y1", "x2", "y2", "topk_ids", "topk_probs", "label_id"}
        missing = need - set(df.columns)
        if missing:
            raise DistillError(f"soft labels lack column(s) {sorted(missing)}; expected the labels contract.")
        out = cls(nc=nc)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, sha in enumerate(df["sha256"].tolist()):
            groups[sha].append(i)
        boxes = df[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
        labels = df["label_id"].to_numpy(np.int64)
        ids, probs = df["topk_ids"].tolist(), df["topk_probs"].tolist()
        for sha, rows in groups.items():
            dist = np.stack([teacher_distribution(ids[r], probs[r], int(labels[r]), nc) for r in rows])
            out.by_image[sha] = (boxes[rows], labels[rows], dist)
        return out

    @classmethod
    def load(cls, path: str | Path, nc: int) -> SoftLabels:
        import pandas as pd

        path = Path(path)
        if not path.is_file():
            raise DistillError(f"{path}: soft labels not found. Run `wanwu stage quality` first (it writes them).")
        cols = ["sha256", "box_id", "x1", "y1", "x2", "y2", "topk_ids", "topk_probs", "label_id"]
        return cls.from_frame(pd.read_parquet(path, columns=cols), nc)

    def columns_for(self, image_key: str, boxes_px: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, int]:
        """Soft rows (n, nc) for an image's dataset boxes; boxes without a matching row get one-hot on their class.

        Rows are matched to boxes by IoU (same label first), not by position, so a dataset writer that dropped a
        duplicate line or reordered boxes cannot shift soft labels onto the wrong box. Returns (rows, n_matched).
        """
        n = len(cls)
        out = np.zeros((n, self.nc), np.float32)
        cls_i = cls.astype(np.int64).ravel()
        valid = (cls_i >= 0) & (cls_i < self.nc)
        out[np.arange(n)[valid], cls_i[valid]] = 1.0
        entry = self.by_image.get(image_key)
        if entry is None or n == 0:
            return out, 0
        t_boxes, t_labels, t_dist = entry
        iou = _iou(boxes_px.astype(np.float32), t_boxes)
        score = iou + (cls_i[:, None] == t_labels[None, :]) * (iou >= MATCH_IOU)
        matched = 0
        used_r: set[int] = set()
        used_c: set[int] = set()
        for flat in np.argsort(-score, axis=None):
            r, c = divmod(int(flat), score.shape[1])
            if iou[r, c] < MATCH_IOU:
                break
            if r in used_r or c in used_c:
                continue
            used_r.add(r)
            used_c.add(c)
            out[r] = t_dist[c]
            matched += 1
        return out, matched


# ---- dataset and trainer ----------------------------------------------------------------------------------
class SoftLabelDataset(YOLODataset):
    """A YOLODataset whose ``cls`` rows are ``[class, p_0 … p_{C-1}]`` (see the module docstring)."""

    soft_width: int = 0

    @classmethod
    def adopt(cls, dataset: YOLODataset, soft: SoftLabels) -> dict[str, int]:
        """Turn a built training dataset into a soft-label one in place; return match counts."""
        if type(dataset) is not YOLODataset:
            raise DistillError(
                f"soft-label distillation needs a plain detection dataset, got {type(dataset).__name__}."
            )
        stats = {"boxes": 0, "matched": 0, "images_with_soft_labels": 0}
        for lb in dataset.labels:
            c = lb["cls"].reshape(-1, 1).astype(np.float32)
            h, w = lb["shape"]
            xywh = lb["bboxes"].reshape(-1, 4)
            px = np.stack(
                [
                    (xywh[:, 0] - xywh[:, 2] / 2) * w,
                    (xywh[:, 1] - xywh[:, 3] / 2) * h,
                    (xywh[:, 0] + xywh[:, 2] / 2) * w,
                    (xywh[:, 1] + xywh[:, 3] / 2) * h,
                ],
                1,
            )
            key = Path(lb["im_file"]).stem
            rows, matched = soft.columns_for(key, px, c[:, 0])
            lb["cls"] = np.concatenate([c, rows], 1)
            stats["boxes"] += len(c)
            stats["matched"] += matched
            stats["images_with_soft_labels"] += key in soft.by_image
        dataset.__class__ = cls
        dataset.soft_width = soft.nc
        return stats

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = super().__getitem__(index)
        c = out["cls"]
        if c.shape[-1] != 1 + self.soft_width:  # ultralytics' Format writes an empty (0, 1) when no box is left
            out["cls"] = torch.zeros((c.shape[0], 1 + self.soft_width), dtype=torch.float32)
        return out


class SoftLabelTrainer(DetectionTrainer):
    """DetectionTrainer with soft labels in the training data and :class:`SoftLabelDetectionLoss` as criterion."""

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: Any = None,
        *,
        soft_labels: SoftLabels | str | Path | None = None,
        temperature: float = 3.0,
        alpha: float = 0.7,
    ):
        self.soft_labels_source = soft_labels
        self.kd_temperature = float(temperature)
        self.kd_alpha = float(alpha)
        self.soft_stats: dict[str, int] = {}
        super().__init__(cfg, overrides, _callbacks)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> KDDetectionModel:
        model = KDDetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1)
        model.kd_temperature, model.kd_alpha = self.kd_temperature, self.kd_alpha
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        return model

    def _soft(self) -> SoftLabels:
        src = self.soft_labels_source
        if isinstance(src, SoftLabels):
            if src.nc != self.data["nc"]:
                raise DistillError(f"soft labels cover {src.nc} classes, the dataset has {self.data['nc']}.")
            return src
        if src is None:
            return SoftLabels(nc=self.data["nc"])  # one-hot on every box: KD then sharpens towards the hard labels
        return SoftLabels.load(src, self.data["nc"])

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        dataset = super().build_dataset(img_path, mode, batch)
        if mode == "train":
            self.soft_stats = SoftLabelDataset.adopt(dataset, self._soft())
            s = self.soft_stats
            log.info("soft labels: %d of %d training boxes matched a teacher row", s["matched"], s["boxes"])
        return dataset

    def preprocess_batch(self, batch: dict) -> dict:
        batch = super().preprocess_batch(batch)
        cls = batch.get("cls")
        if cls is not None and cls.ndim == 2 and cls.shape[1] > 1:
            batch["soft"], batch["cls"] = cls[:, 1:], cls[:, :1]
        return batch

    def save_model(self):
        # Checkpoints hold a plain DetectionModel: any ultralytics install loads them, with no wanwu import.
        ema = self.ema.ema
        target = getattr(ema, "student_model", ema)
        swap = type(target) is KDDetectionModel
        if swap:
            target.__class__ = DetectionModel
        try:
            return super().save_model()
        finally:
            if swap:
                target.__class__ = KDDetectionModel

    def get_class_counts(self):
        classes = np.concatenate([lb["cls"][:, 0] for lb in self.train_loader.dataset.labels], 0)
        return np.bincount(classes.astype(int), minlength=self.data["nc"]).astype(np.float32)

    def plot_training_labels(self):
        from ultralytics.utils.plotting import plot_labels

        boxes = np.concatenate([lb["bboxes"] for lb in self.train_loader.dataset.labels], 0)
        cls = np.concatenate([lb["cls"][:, 0] for lb in self.train_loader.dataset.labels], 0)
        plot_labels(boxes, cls, names=self.data["names"], save_dir=self.save_dir, on_plot=self.on_plot)


def soft_label_trainer(soft_labels: SoftLabels | str | Path | None, temperature: float, alpha: float, tag: str = ""):
    """A trainer factory for :func:`wanwu.training.fit`; ``tag`` enters the resume fingerprint (e.g. a file hash)."""
    factory = functools.partial(SoftLabelTrainer, soft_labels=soft_labels, temperature=temperature, alpha=alpha)
    factory.fingerprint_tag = f"SoftLabelTrainer T={temperature} alpha={alpha} {tag}"  # type: ignore[attr-defined]
    return factory
