"""The quality gate: nothing trains on labels this module has not passed.

What it does, in order (the stage in ``tasks/quality.py`` wires it to files):

1. **Selection.** Per image one label source: human labels (seed, gold, or any image a human labeled) win over
   auto labels; pool images take the autolabel stage's boxes. Boxes labeled −1 (other) are counted, never trained
   on; auto boxes flagged ``needs_review`` stay out unless ``quality.include_needs_review``; duplicate auto boxes
   go through class-aware NMS (``torchvision.ops.batched_nms``, one call for all images: the group of a box is
   its (image, class) pair).
2. **Splits** by image hash, so an image never changes split when data is added: the first 52 bits of the
   image's sha256 (of its pixels, uniform) give a number u in [0, 1) and fixed thresholds cut it 6:2:2. Gold
   images are the test set; then the rest splits train:val 6:2. *Stratified by dominant class*: a hash is
   independent of the class, so every class is split 6:2:2 in expectation, and no per-class threshold is needed;
   per-class quotas that are exact would have to rank the images of a class, and ranks change when data is added,
   which would move old images between splits. Stability wins; the per-class shares are reported. Near-duplicate
   images (perceptual-hash distance ≤ ``quality.near_dup_distance``) share one split: the group takes the hash
   of its smallest sha256; a non-gold near-duplicate of a gold image is left out (it would leak the test set).
3. **great-expectations suites** (1.x API) over eight tables derived from the manifest and the labels: every
   check, including the ones GE cannot express directly (top-k sums, split leakage, images per class, class
   balance, drift), is a built-in expectation on a derived column, so all show in GE's data docs.
4. **Label issues**: cleanlab's ObjectLab scores (``cleanlab.object_detection.rank``) of human labels against
   the out-of-sample boxes of the proposer + teacher (a different model from the people who drew the labels; it
   never trained on gold images), or against a champion detector's predictions when ``quality.champion`` names
   one. The worst boxes go to a Label Studio review queue.
5. **Drift**: population stability index (PSI) of the class distribution and simple image statistics against
   the last accepted dataset's reference.
6. **Auto-label precision / recall** against the sample world's truth, or against the human gold labels (what a
   real user has), measured, never trained on.

A failed expectation raises :class:`QualityGateFailed` listing every failure with the observed value, the
threshold and what to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wanwu import contracts
from wanwu.config import QualityParams
from wanwu.ontology import OTHER_ID, Ontology

SPLITS = ("train", "val", "test")
MATCH_IOU = 0.5  # a predicted box counts as the reference box at this IoU (the usual mAP50 criterion)
PSI_EPS = 1e-4  # a bin empty on one side would make PSI infinite; this is the customary floor
LABEL_COLS = contracts.SCHEMAS["labels"].names
DRIFT_FEATURES = ("brightness", "contrast", "width", "height", "box_size", "boxes_per_image")
REFERENCE_VERSION = 1


class QualityError(RuntimeError):
    """The stage cannot start (an input table is missing or unreadable); names the file and the fix."""


# ---- inputs ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The tables the gate reads; ``auto`` is None when the autolabel stage has not run (imports need none)."""

    manifest: pd.DataFrame
    human: pd.DataFrame
    auto: pd.DataFrame | None = None
    truth: pd.DataFrame | None = None
    data_dir: Path | None = None  # where manifest paths point (raw/<sha[:2]>/<sha>.jpg)
    autolabel_metrics: dict | None = None
    champion_predictions: pd.DataFrame | None = None  # labels-contract rows from quality.champion, if any


def load_inputs(data_dir: Path) -> Inputs:
    """Read the collect (and, when present, autolabel) outputs under ``data_dir``."""
    data_dir = Path(data_dir)
    collect = data_dir / "collect"
    manifest_path = collect / "manifest.parquet"
    if not manifest_path.is_file():
        raise QualityError(f"{manifest_path}: no manifest. Run `wanwu stage collect` first.")
    manifest = contracts.read("manifest", manifest_path)
    human_path = collect / "human_labels.parquet"
    human = contracts.read("labels", human_path) if human_path.is_file() else contracts.empty("labels")
    auto_path = data_dir / "autolabel" / "labels.parquet"
    auto = contracts.read("labels", auto_path) if auto_path.is_file() else None
    truth_path = collect / "truth.parquet"
    truth = contracts.read("labels", truth_path) if truth_path.is_file() else None
    if truth is not None and truth.empty:
        truth = None
    metrics_path = data_dir / "autolabel" / "metrics.json"
    metrics = None
    if metrics_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return Inputs(manifest, human, auto, truth, data_dir, metrics)


# ---- results ------------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """One expectation's outcome, in words a user can act on."""

    id: str
    table: str
    what: str
    success: bool
    observed: str
    threshold: str
    fix: str
    examples: list[str] = field(default_factory=list)

    def message(self) -> str:
        ex = f" Examples: {'; '.join(self.examples)}." if self.examples else ""
        return f"{self.what} [{self.id}]: observed {self.observed}; threshold {self.threshold}.{ex} Fix: {self.fix}"

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "table": self.table,
            "what": self.what,
            "success": self.success,
            "observed": self.observed,
            "threshold": self.threshold,
            "fix": self.fix,
            "examples": self.examples,
        }


class QualityGateFailed(Exception):
    """The labels did not pass: every failed expectation with its observed value, threshold and fix."""

    def __init__(self, failures: list[CheckResult], total: int, report: Path | None = None):
        self.failures = failures
        self.total = total
        self.report = report
        lines = [
            f"quality gate failed: {len(failures)} of {total} expectations not met. No dataset was written "
            "(data/quality/dataset), so nothing downstream trains on these labels."
        ]
        lines += [f"  - {f.message()}" for f in failures]
        if report is not None:
            lines.append(f"Report: {report} (with great-expectations' data docs linked from it).")
        super().__init__("\n".join(lines))


@dataclass
class Analysis:
    """Everything the gate computed; the stage writes the dataset, the report and the metrics from it."""

    images: pd.DataFrame  # dataset images: sha256, path, width, height, role, label_origin, phash, split, n_boxes
    boxes: pd.DataFrame  # dataset boxes, labels contract, in label-file order, box_id = line number
    dropped: pd.DataFrame  # boxes left out: sha256, box_id, origin, label_id, confidence, reason
    excluded: pd.DataFrame  # images left out: sha256, role, reason
    auto_scored: pd.DataFrame  # every auto box with `passes` (would enter a dataset) for P/R and the plots
    tables: dict[str, pd.DataFrame]
    drift: list[dict]
    reference: dict
    pr: dict
    label_scores: pd.DataFrame  # scored boxes: sha256, box_id, origin, label_id, swap, badloc, score
    image_scores: pd.DataFrame  # sha256, score
    counts: dict
    notes: list[str] = field(default_factory=list)


# ---- small helpers ------------------------------------------------------------------------------------------
def _labels_frame(df: pd.DataFrame | None) -> pd.DataFrame:
    return contracts.empty("labels") if df is None else df


def _list_len(v: Any) -> int:
    return 0 if v is None else len(v)


def _list_sum(v: Any) -> float:
    return 0.0 if v is None or len(v) == 0 else float(np.sum(np.asarray(v, dtype=np.float64)))


def hash_unit(key: str) -> float:
    """A sha256 hex digest → u in [0, 1): its first 52 bits (uniform, so a fixed threshold splits it fairly)."""
    return int(key[:13], 16) / float(16**13)


def nms_keep(boxes: pd.DataFrame, iou: float) -> np.ndarray:
    """Class-aware NMS over many images in one torchvision call: the group of a box is (image, label)."""
    if boxes.empty:
        return np.zeros(0, dtype=bool)
    import torch
    from torchvision.ops import batched_nms

    image_idx = pd.factorize(boxes["sha256"])[0].astype(np.int64)
    label = boxes["label_id"].to_numpy(np.int64) - OTHER_ID  # ≥ 0
    groups = image_idx * (int(label.max()) + 1) + label
    xyxy = torch.tensor(boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64))  # float64: exact group offsets
    scores = torch.tensor(boxes["confidence"].fillna(0).to_numpy(np.float64))
    kept = batched_nms(xyxy, scores, torch.as_tensor(groups), float(iou)).numpy()
    mask = np.zeros(len(boxes), dtype=bool)
    mask[kept] = True
    return mask


def _phash_words(phashes: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Hex perceptual hashes → (n, words) uint64 and a validity mask (null or malformed hashes are skipped)."""
    values = phashes.fillna("").astype(str).tolist()
    lengths = {len(v) for v in values if v}
    width = max(lengths) if lengths else 16
    words = max(1, math.ceil(width / 16))
    out = np.zeros((len(values), words), dtype=np.uint64)
    valid = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if not v or len(v) != width:
            continue
        try:
            padded = v.rjust(words * 16, "0")
            out[i] = [int(padded[k * 16 : (k + 1) * 16], 16) for k in range(words)]
            valid[i] = True
        except ValueError:
            continue
    return out, valid


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between every row of ``a`` and every row of ``b`` (uint64 words)."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int32)


def close_pairs(words: np.ndarray, valid: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i, j, d), i < j, of valid hashes within ``max_distance``: chunked, O(n²) but vectorised."""
    idx = np.flatnonzero(valid)
    h = words[idx]
    n = len(idx)
    out: list[np.ndarray] = []
    step = max(1, 2**21 // max(n, 1))
    for s in range(0, n, step):
        d = _distances(h[s : s + step], h)
        i, j = np.nonzero(d <= max_distance)
        i = i + s
        keep = i < j
        if keep.any():
            out.append(np.stack([idx[i[keep]], idx[j[keep]], d[i[keep] - s, j[keep]]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def nearest_other_group(words: np.ndarray, valid: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the distance to and index of the closest valid row in a *different* group (−1 if none)."""
    n = len(words)
    dist = np.full(n, -1, dtype=np.int64)
    arg = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(valid)
    if len(idx) < 2:
        return dist, arg
    h, g = words[idx], groups[idx]
    big = 64 * words.shape[1] + 1
    step = max(1, 2**21 // len(idx))
    for s in range(0, len(idx), step):
        d = _distances(h[s : s + step], h)
        d[g[s : s + step, None] == g[None, :]] = big
        j = d.argmin(axis=1)
        best = d[np.arange(len(j)), j]
        rows = idx[s : s + step]
        ok = best < big
        dist[rows[ok]] = best[ok]
        arg[rows[ok]] = idx[j[ok]]
    return dist, arg


# ---- 1. selection -----------------------------------------------------------------------------------------------
def select(
    inputs: Inputs, params: QualityParams
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Which images and boxes enter the dataset, and why the rest do not.

    Returns (images, boxes, dropped, auto_scored, counts): ``auto_scored`` is every auto box with ``reason``
    ("" when it passes the filters and NMS) whether or not its image takes auto labels, for P/R and plots.
    """
    man = inputs.manifest
    human = _labels_frame(inputs.human)
    role = man.set_index("sha256")["split"]
    human_imgs = set(human["sha256"]) | set(man.loc[man["split"].isin(["seed", "gold"]), "sha256"])
    human_imgs &= set(man["sha256"])
    pool = set(man.loc[man["split"] == "pool", "sha256"])
    auto_imgs = pool - human_imgs if inputs.auto is not None else set()
    counts: dict[str, Any] = {}

    # human boxes: all of them, except "other"
    h = human[human["sha256"].isin(human_imgs)].copy()
    h["reason"] = np.where(h["label_id"] == OTHER_ID, "other", "")
    cand = h["reason"] == ""
    counts["human_duplicates_kept"] = int((~nms_keep(h[cand], params.nms_iou)).sum()) if cand.any() else 0

    # auto boxes: filters, then class-aware NMS among the survivors
    a = _labels_frame(inputs.auto).copy()
    reason = np.full(len(a), "", dtype=object)
    other = (a["label_id"] == OTHER_ID).to_numpy()
    # an unsure "other" may be an object the teachers could not name (19-23 % of the CPU hour's under 0.8 were):
    # with quality.min_other_confidence it is left out (and painted) instead of taught as background
    unsure_other = other & (a["confidence"].fillna(0) < params.min_other_confidence).to_numpy()
    reason[other & ~unsure_other] = "other"
    reason[unsure_other] = "unsure_other"
    review = a["needs_review"].fillna(False).astype(bool).to_numpy()
    if not params.include_needs_review:
        reason[(reason == "") & review] = "needs_review"
    low = (a["confidence"].fillna(0) < params.min_auto_confidence).to_numpy()
    reason[(reason == "") & low] = "low_confidence"
    weak = (a["proposer_conf"].fillna(1.0) < params.min_proposer_conf).to_numpy()
    reason[(reason == "") & weak] = "low_proposer_conf"
    cand = reason == ""
    if cand.any():
        keep = nms_keep(a[cand], params.nms_iou)
        idx = np.flatnonzero(cand)
        reason[idx[~keep]] = "duplicate"
    a["reason"] = reason
    a["passes"] = reason == ""
    auto_scored = a

    # An auto-labeled image where no box passed is not known to be background: the labeler was unsure or missed.
    # Training on it would teach "nothing here"; it stays out (counted, its boxes are in the review queue).
    with_box = set(a.loc[a["passes"], "sha256"]) & auto_imgs
    counts["auto_images_without_box"] = len(auto_imgs - with_box)
    if not params.keep_auto_background:
        auto_imgs = with_box

    in_auto_img = a["sha256"].isin(auto_imgs)
    auto_dropped = a[~a["passes"] & in_auto_img]
    overridden = a[a["sha256"].isin(human_imgs)].assign(reason="overridden_by_human")
    keep_cols = ["sha256", "box_id", "origin", "label_id", "confidence", "reason"]
    dropped = pd.concat(
        [h.loc[h["reason"] != "", keep_cols], auto_dropped[keep_cols], overridden[keep_cols]], ignore_index=True
    )
    boxes = pd.concat([h.loc[h["reason"] == "", LABEL_COLS], a.loc[a["passes"] & in_auto_img, LABEL_COLS]])
    boxes = boxes.sort_values(["sha256", "origin", "box_id"], kind="stable").reset_index(drop=True)

    chosen = man[man["sha256"].isin(human_imgs | auto_imgs)].copy()
    chosen["role"] = chosen["split"]
    chosen["label_origin"] = np.where(chosen["sha256"].isin(human_imgs), "human", "auto")
    images = chosen[["sha256", "path", "width", "height", "role", "label_origin", "phash"]].reset_index(drop=True)
    counts["pool_unlabeled"] = int(((role == "pool") & ~role.index.isin(list(human_imgs | auto_imgs))).sum())
    return images, boxes, dropped, auto_scored, counts


# ---- 2. splits ----------------------------------------------------------------------------------------------------
def assign_splits(images: pd.DataFrame, ratios: dict[str, float], near_dup_distance: int) -> pd.DataFrame:
    """sha256 → split, group key and exclusion reason (see the module docstring for why this is stable).

    ``images`` needs sha256, role and phash. Returns a frame aligned with it: split, group, excluded.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(images)
    sha = images["sha256"].to_numpy(dtype=object)
    gold = (images["role"] == "gold").to_numpy()
    words, valid = _phash_words(images["phash"]) if n else (np.zeros((0, 1), np.uint64), np.zeros(0, bool))
    pairs = close_pairs(words, valid, near_dup_distance) if n else np.zeros((0, 3), np.int64)
    excluded = np.full(n, "", dtype=object)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        cross = gold[i] != gold[j]
        near_gold = np.where(gold[i[cross]], j[cross], i[cross])
        excluded[near_gold] = "near_duplicate_of_gold"
    rest = ~gold & (excluded == "")
    group = sha.copy()
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        both = rest[i] & rest[j]
        graph = coo_matrix((np.ones(int(both.sum())), (i[both], j[both])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        frame = pd.DataFrame({"comp": comp, "sha": sha})
        smallest = frame[rest].groupby("comp")["sha"].min()
        group = np.where(rest, frame["comp"].map(smallest).fillna(frame["sha"]).to_numpy(dtype=object), sha)
    u = np.array([hash_unit(g) for g in group]) if n else np.zeros(0)
    if gold.any():
        c1, c2 = ratios["train"] / (ratios["train"] + ratios["val"]), 1.0
    else:
        total = sum(ratios.values())
        c1, c2 = ratios["train"] / total, (ratios["train"] + ratios["val"]) / total
    split = np.where(u < c1, "train", np.where(u < c2, "val", "test")).astype(object)
    split[gold] = "test"
    split[excluded != ""] = ""
    return pd.DataFrame({"split": split, "group": group, "excluded": excluded}, index=images.index)


# ---- image statistics and drift ------------------------------------------------------------------------------
def _image_stat(path: Path) -> tuple[float, float]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("L", (64, 64))  # JPEG: decode at 1/2..1/8 scale, plenty for mean and contrast
            g = np.asarray(im.convert("L"), dtype=np.float32)
        return float(g.mean()), float(g.std())
    except (OSError, ValueError):
        return float("nan"), float("nan")


def image_stats(paths: Iterable[Path], workers: int = 4) -> pd.DataFrame:
    """Mean brightness and contrast (standard deviation of grey levels, 0..255) of each image."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        stats = list(pool.map(_image_stat, paths))
    arr = np.array(stats, dtype=np.float64).reshape(-1, 2)
    return pd.DataFrame({"brightness": arr[:, 0], "contrast": arr[:, 1]})


def feature_values(images: pd.DataFrame, boxes: pd.DataFrame) -> dict[str, np.ndarray]:
    """The per-image and per-box numbers drift is measured on."""
    size = images.set_index("sha256")[["width", "height"]]
    bw = (boxes["x2"] - boxes["x1"]).to_numpy(np.float64)
    bh = (boxes["y2"] - boxes["y1"]).to_numpy(np.float64)
    area = boxes["sha256"].map(size["width"]).astype("float64") * boxes["sha256"].map(size["height"]).astype("float64")
    area = area.to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.sqrt(np.clip(bw * bh, 0, None) / area)
    out = {
        "brightness": images.get("brightness", pd.Series(dtype=float)).to_numpy(np.float64),
        "contrast": images.get("contrast", pd.Series(dtype=float)).to_numpy(np.float64),
        "width": images["width"].to_numpy(np.float64),
        "height": images["height"].to_numpy(np.float64),
        "box_size": rel,
        "boxes_per_image": images["n_boxes"].to_numpy(np.float64),
    }
    return {k: v[np.isfinite(v)] for k, v in out.items()}


def class_distribution(boxes: pd.DataFrame) -> dict[str, float]:
    counts = boxes["label_id"].value_counts()
    total = int(counts.sum())
    return {str(int(k)): float(v) / total for k, v in counts.sort_index().items()} if total else {}


def reference_stats(values: dict[str, np.ndarray], classes: dict[str, float], bins: int, n_images: int) -> dict:
    """What the next run's drift check compares with: quantile bin edges and proportions of each feature."""
    features = {}
    for name in DRIFT_FEATURES:
        v = values.get(name, np.zeros(0))
        if len(v) == 0:
            continue
        edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
        features[name] = {"edges": edges.tolist(), "proportions": _proportions(v, edges).tolist(), "n": len(v)}
    return {"version": REFERENCE_VERSION, "n_images": n_images, "features": features, "classes": classes}


def _proportions(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index Σ (a − e) · ln(a / e), with empty bins floored at PSI_EPS."""
    e = np.clip(np.asarray(expected, dtype=np.float64), PSI_EPS, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), PSI_EPS, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def drift_rows(reference: dict | None, values: dict[str, np.ndarray], classes: dict[str, float]) -> list[dict]:
    """PSI of each feature (and the class distribution) against the reference; [] when there is none yet."""
    if not reference:
        return []
    rows = []
    ref_classes = reference.get("classes") or {}
    if ref_classes or classes:
        ids = sorted(set(ref_classes) | set(classes), key=int)
        e = np.array([ref_classes.get(k, 0.0) for k in ids])
        a = np.array([classes.get(k, 0.0) for k in ids])
        rows.append({"feature": "class_distribution", "psi": psi(e, a) if a.sum() and e.sum() else 0.0})
    for name, ref in (reference.get("features") or {}).items():
        v = values.get(name)
        if v is None or len(v) == 0:
            continue
        edges = np.asarray(ref["edges"], dtype=np.float64)
        rows.append({"feature": name, "psi": psi(np.asarray(ref["proportions"]), _proportions(v, edges))})
    for r in rows:
        r["psi"] = round(float(r["psi"]), 6)
    return rows


# ---- auto-label precision / recall -------------------------------------------------------------------------
def match_counts(preds: pd.DataFrame, refs: pd.DataFrame, iou: float = MATCH_IOU) -> pd.DataFrame:
    """Greedy by confidence, one reference box per prediction: per class tp, predictions and references.

    Also a class-agnostic row (class_id −2) that measures localisation alone. IoUs come from torchvision's box ops;
    the images are sliced out of one sorted array (no per-image pandas work, so 1,000 images take well under 1 s).
    """
    import torch
    from torchvision.ops import box_iou

    cols = ["x1", "y1", "x2", "y2"]
    p = preds.assign(_o=-preds["confidence"].fillna(0).astype(np.float64)).sort_values(["sha256", "_o"], kind="stable")
    r = refs.sort_values("sha256", kind="stable")
    ps, rs = p["sha256"].to_numpy(dtype=str), r["sha256"].to_numpy(dtype=str)
    pb, rb = p[cols].to_numpy(np.float64), r[cols].to_numpy(np.float64)
    pl, rl = p["label_id"].to_numpy(np.int64), r["label_id"].to_numpy(np.int64)
    ru, rstart, rcount = np.unique(rs, return_index=True, return_counts=True)
    ref_slice = {k: (a, a + n) for k, a, n in zip(ru.tolist(), rstart.tolist(), rcount.tolist(), strict=True)}
    pu, pstart, pcount = np.unique(ps, return_index=True, return_counts=True)
    tp: dict[int, int] = {}
    tp_any = 0
    for sha, a, n in zip(pu.tolist(), pstart.tolist(), pcount.tolist(), strict=True):
        if sha not in ref_slice:
            continue
        c, d = ref_slice[sha]
        ious = box_iou(torch.tensor(pb[a : a + n]), torch.tensor(rb[c:d])).numpy()
        labels_p, labels_r = pl[a : a + n], rl[c:d]
        for aware in (True, False):
            m = np.where(labels_p[:, None] == labels_r[None, :], ious, 0.0) if aware else ious
            used = np.zeros(d - c, dtype=bool)
            for i in range(n):
                row = np.where(used, -1.0, m[i])
                j = int(row.argmax())
                if row[j] >= iou:
                    used[j] = True
                    if aware:
                        tp[int(labels_p[i])] = tp.get(int(labels_p[i]), 0) + 1
                    else:
                        tp_any += 1
    n_pred = preds["label_id"].value_counts()
    n_ref = refs["label_id"].value_counts()
    ids = sorted(set(n_pred.index) | set(n_ref.index))
    rows = [
        {"class_id": int(c), "tp": tp.get(int(c), 0), "pred": int(n_pred.get(c, 0)), "ref": int(n_ref.get(c, 0))}
        for c in ids
    ]
    rows.append({"class_id": -2, "tp": tp_any, "pred": len(preds), "ref": len(refs)})
    return pd.DataFrame(rows, columns=["class_id", "tp", "pred", "ref"])


def _pr(tp: int, pred: int, ref: int) -> dict:
    return {
        "precision": round(tp / pred, 4) if pred else None,
        "recall": round(tp / ref, 4) if ref else None,
        "tp": int(tp),
        "predicted": int(pred),
        "reference": int(ref),
    }


def autolabel_pr(inputs: Inputs, auto_scored: pd.DataFrame, ontology: Ontology) -> dict:
    """Auto-label precision and recall at IoU 0.5, overall and per class, of all and of accepted auto boxes.

    The reference is the sample world's truth when it exists, else the human gold labels on gold images (what a
    real user has). Measured only; never used to choose labels.
    """
    if inputs.auto is None:
        return {"reference": None, "note": "no auto labels (the autolabel stage has not run)"}
    man = inputs.manifest
    processed = set(man.loc[man["split"].isin(["pool", "gold"]), "sha256"]) | set(auto_scored["sha256"])
    if inputs.truth is not None:
        source = "truth"
        refs = inputs.truth[inputs.truth["sha256"].isin(processed)]
        images = processed
    else:
        source = "gold"
        images = processed & set(man.loc[man["split"] == "gold", "sha256"])
        refs = _labels_frame(inputs.human)
        refs = refs[refs["sha256"].isin(images)]
        if not images:
            return {"reference": None, "note": "no truth and no gold images: precision/recall cannot be measured"}
    refs = refs[refs["label_id"] != OTHER_ID]
    preds = auto_scored[auto_scored["sha256"].isin(images) & (auto_scored["label_id"] != OTHER_ID)]
    out: dict[str, Any] = {"reference": source, "iou": MATCH_IOU, "images": len(images)}
    for name, p in (("all", preds), ("accepted", preds[preds["passes"]])):
        m = match_counts(p, refs)
        agnostic = m[m["class_id"] == -2].iloc[0]
        per = m[m["class_id"] >= 0]
        out[name] = {
            **_pr(int(per["tp"].sum()), int(per["pred"].sum()), int(per["ref"].sum())),
            "localisation": _pr(int(agnostic["tp"]), int(agnostic["pred"]), int(agnostic["ref"])),
            "per_class": {
                str(int(r.class_id)): {"name": ontology.zh(int(r.class_id)), **_pr(r.tp, r.pred, r.ref)}
                for r in per.itertuples()
                if 0 <= int(r.class_id) < len(ontology)
            },
        }
    return out


# ---- label issues (cleanlab) ---------------------------------------------------------------------------------
def _pred_arrays(preds: pd.DataFrame, k: int) -> list[np.ndarray]:
    """One image's predicted boxes → cleanlab's per-class arrays [x1, y1, x2, y2, p] using the full top-k.

    p is the teacher's probability of the class (what the scores judge: the class of a box, and its place);
    the proposer's objectness is left out, it only said that something is there.
    """
    per: list[list[list[float]]] = [[] for _ in range(k)]
    for r in preds.itertuples(index=False):
        ids = r.topk_ids if r.topk_ids is not None and len(r.topk_ids) else [r.label_id]
        probs = r.topk_probs if r.topk_probs is not None and len(r.topk_probs) else [r.confidence]
        for c, p in zip(ids, probs, strict=False):
            if 0 <= int(c) < k and np.isfinite(p):
                per[int(c)].append([r.x1, r.y1, r.x2, r.y2, float(np.clip(p, 0, 1))])
    return [np.asarray(v, dtype=np.float64).reshape(-1, 5) for v in per]


def label_quality(
    labels: pd.DataFrame, preds: pd.DataFrame, images: list[str], num_classes: int, confident: float = 0.8
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cleanlab ObjectLab scores of ``labels`` against out-of-sample ``preds`` on ``images``.

    Returns (image scores [sha256, score], box scores [sha256, box_id, origin, label_id, swap, badloc, score]);
    a box's score is the lower of its swap (wrong class) and badloc (bad box) scores, 0 = surely wrong.
    ``confident`` is cleanlab's ``high_probability_threshold`` for swaps: a prediction of another class at least
    this probable on the same spot makes a label suspect (cleanlab's 0.95 suits calibrated detectors; a teacher's
    top-1 over many classes is rarely that sure).
    """
    cols = ["sha256", "box_id", "origin", "label_id", "swap", "badloc", "score"]
    if not images:
        return pd.DataFrame(columns=["sha256", "score"]), pd.DataFrame(columns=cols)
    from cleanlab.object_detection.rank import (
        compute_badloc_box_scores,
        compute_swap_box_scores,
        get_label_quality_scores,
    )

    # cleanlab guesses its prediction format from the shapes and mistakes exactly three classes for another one
    k = num_classes + 1 if num_classes == 3 else num_classes
    lab = labels[(labels["label_id"] >= 0) & (labels["label_id"] < num_classes)]
    lab_groups = {s: g.sort_values("box_id") for s, g in lab.groupby("sha256", sort=False)}
    pred_groups = {s: g for s, g in preds.groupby("sha256", sort=False)}
    empty_labels = pd.DataFrame(columns=labels.columns)
    label_list, pred_list, order = [], [], []
    for sha in images:
        g = lab_groups.get(sha, empty_labels)
        label_list.append(
            {
                "bboxes": g[["x1", "y1", "x2", "y2"]].to_numpy(np.float64).reshape(-1, 4),
                "labels": g["label_id"].to_numpy(np.int64),
                "image_name": sha,
            }
        )
        pred_list.append(_pred_arrays(pred_groups.get(sha, preds.iloc[0:0]), k))
        order.append(g)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img_scores = get_label_quality_scores(label_list, pred_list, verbose=False)
        swap = compute_swap_box_scores(labels=label_list, predictions=pred_list, high_probability_threshold=confident)
        badloc = compute_badloc_box_scores(labels=label_list, predictions=pred_list)
    rows = []
    for g, s, b in zip(order, swap, badloc, strict=True):
        for r, sv, bv in zip(g.itertuples(index=False), s, b, strict=True):
            rows.append(
                {
                    "sha256": r.sha256,
                    "box_id": int(r.box_id),
                    "origin": r.origin,
                    "label_id": int(r.label_id),
                    "swap": float(sv),
                    "badloc": float(bv),
                    "score": float(min(sv, bv)),
                }
            )
    return (
        pd.DataFrame({"sha256": images, "score": np.asarray(img_scores, dtype=np.float64)}),
        pd.DataFrame(rows, columns=cols),
    )


# ---- the analysis -------------------------------------------------------------------------------------------
def analyse(
    inputs: Inputs,
    params: QualityParams,
    ontology: Ontology,
    reference: dict | None = None,
    stats: pd.DataFrame | None = None,
) -> Analysis:
    """Everything the gate needs, computed once and in memory; no expectation is evaluated here.

    ``stats`` (sha256, brightness, contrast) may be given; otherwise images are read from ``inputs.data_dir``.
    """
    notes: list[str] = []
    raw_inputs = inputs
    if inputs.manifest["sha256"].duplicated().any():  # the manifest suite reports it; the rest reads one row each
        inputs = replace(inputs, manifest=inputs.manifest.drop_duplicates("sha256"))
    images, boxes, dropped, auto_scored, counts = select(inputs, params)

    # splits
    s = assign_splits(images, params.split_ratios, params.near_dup_distance)
    images = images.join(s)
    excluded = images.loc[images["excluded"] != "", ["sha256", "role"]].assign(
        reason=images.loc[images["excluded"] != "", "excluded"]
    )
    if not excluded.empty:
        gone = set(excluded["sha256"])
        left = boxes[boxes["sha256"].isin(gone)]
        dropped = pd.concat(
            [
                dropped,
                left[["sha256", "box_id", "origin", "label_id", "confidence"]].assign(reason="near_duplicate_of_gold"),
            ],
            ignore_index=True,
        )
        boxes = boxes[~boxes["sha256"].isin(gone)].reset_index(drop=True)
        images = images[images["excluded"] == ""].reset_index(drop=True)
    unl = inputs.manifest[(inputs.manifest["split"] == "pool") & ~inputs.manifest["sha256"].isin(images["sha256"])]
    unl = unl[~unl["sha256"].isin(excluded["sha256"])]
    if inputs.auto is None and len(unl):
        notes.append(f"{len(unl)} pool images have no labels yet (the autolabel stage has not run): left out.")
    excluded = pd.concat(
        [excluded, unl[["sha256", "split"]].rename(columns={"split": "role"}).assign(reason="unlabeled")],
        ignore_index=True,
    )
    images = images.drop(columns=["excluded"])

    # boxes in label-file order, box_id = line number; human boxes get one-hot soft labels
    boxes = boxes.reset_index(drop=True)
    boxes["box_id"] = boxes.groupby("sha256").cumcount().astype(np.int32)
    human = (boxes["origin"] != "auto").to_numpy()
    boxes["topk_ids"] = [
        [int(c)] if hum else v for hum, c, v in zip(human, boxes["label_id"], boxes["topk_ids"], strict=True)
    ]
    boxes["topk_probs"] = [[1.0] if hum else v for hum, v in zip(human, boxes["topk_probs"], strict=True)]
    n_boxes = boxes["sha256"].value_counts()
    images["n_boxes"] = images["sha256"].map(n_boxes).fillna(0).astype(int)
    images["split"] = images["split"].astype(str)

    # image statistics (drift)
    if stats is None and inputs.data_dir is not None:
        st = image_stats([inputs.data_dir / p for p in images["path"]], params.workers)
        st.index = images.index
        images = images.join(st)
    elif stats is not None:
        images = images.merge(stats[["sha256", "brightness", "contrast"]], on="sha256", how="left")
    values = feature_values(images, boxes)
    classes = class_distribution(boxes)
    drift = drift_rows(reference, values, classes)
    if not reference:
        notes.append(
            "No reference yet (first accepted run): drift is recorded as none; this run becomes the reference."
        )
    ref = reference_stats(values, classes, params.drift_bins, len(images))

    # auto-label precision / recall (measured, not used)
    pr = autolabel_pr(inputs, auto_scored, ontology)

    # label issues
    label_scores, image_scores, how = _score_labels(inputs, boxes, images, ontology, params.label_issue_min_prob)
    counts["label_issue_source"] = how
    tables = build_tables(raw_inputs, images, boxes, drift, ontology, params)
    counts.update(_counts(images, boxes, dropped, excluded))
    return Analysis(
        images=images,
        boxes=boxes,
        dropped=dropped,
        excluded=excluded,
        auto_scored=auto_scored,
        tables=tables,
        drift=drift,
        reference=ref,
        pr=pr,
        label_scores=label_scores,
        image_scores=image_scores,
        counts=counts,
        notes=notes,
    )


def _score_labels(
    inputs: Inputs, boxes: pd.DataFrame, images: pd.DataFrame, ontology: Ontology, confident: float
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Which labels can be scored out of sample, and against what (see the module docstring)."""
    if inputs.champion_predictions is not None:
        preds = inputs.champion_predictions
        shas = sorted(set(images["sha256"]))
        how = "champion predictions on every dataset image"
        labels = boxes
    elif inputs.auto is not None:
        # human-labeled images the proposer + teacher also labeled: those models never trained on them
        auto = inputs.auto
        human_imgs = set(images.loc[images["label_origin"] == "human", "sha256"])
        shas = sorted(
            human_imgs & (set(auto["sha256"]) | set(inputs.manifest.loc[inputs.manifest["split"] == "gold", "sha256"]))
        )
        preds = auto
        labels = boxes[boxes["sha256"].isin(shas)]
        how = "human labels against the proposer + teacher's auto labels (out of sample: gold never trains them)"
    else:
        return pd.DataFrame(columns=["sha256", "score"]), pd.DataFrame(), "none (no out-of-sample predictions)"
    img, box = label_quality(labels, preds, shas, len(ontology), confident)
    return box, img, how


def _counts(images: pd.DataFrame, boxes: pd.DataFrame, dropped: pd.DataFrame, excluded: pd.DataFrame) -> dict:
    split_of = images.set_index("sha256")["split"]
    bsplit = boxes["sha256"].map(split_of)
    return {
        "images": {s: int((images["split"] == s).sum()) for s in SPLITS},
        "images_total": len(images),
        "background_images": int((images["n_boxes"] == 0).sum()),
        "boxes": {s: int((bsplit == s).sum()) for s in SPLITS},
        "boxes_by_origin": {k: int(v) for k, v in boxes["origin"].value_counts().items()},
        "boxes_total": len(boxes),
        "boxes_left_out": {k: int(v) for k, v in dropped["reason"].value_counts().items()},
        "other_boxes": int((dropped["reason"] == "other").sum()),
        "images_left_out": {k: int(v) for k, v in excluded["reason"].value_counts().items()},
    }


# ---- 3. the tables GE validates --------------------------------------------------------------------------------
def build_tables(
    inputs: Inputs,
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    drift: list[dict],
    ontology: Ontology,
    params: QualityParams,
) -> dict[str, pd.DataFrame]:
    """The derived tables the suites run on; each has a ``ref`` column that names the row for messages."""
    import pyarrow as pa
    import pyarrow.compute as pc

    man = inputs.manifest
    w, h = man["width"].astype("float64"), man["height"].astype("float64")
    exists = (
        [(inputs.data_dir / p).is_file() if isinstance(p, str) and p else False for p in man["path"]]
        if inputs.data_dir is not None
        else [True] * len(man)
    )
    manifest = pd.DataFrame(
        {
            "sha256": man["sha256"].astype(str).to_numpy(),
            "split": man["split"].astype(object).to_numpy(),
            "width": w.to_numpy(),
            "height": h.to_numpy(),
            "short_side": np.minimum(w, h).to_numpy(),
            "long_side": np.maximum(w, h).to_numpy(),
            "file_exists": np.asarray(exists, dtype=bool),
            "path": man["path"].astype(str).to_numpy(),
            "ref": (man["sha256"].str[:12] + " (" + man["split"].astype(str) + ")").to_numpy(),
        }
    )

    labels = pd.concat([_labels_frame(inputs.human), _labels_frame(inputs.auto)], ignore_index=True)
    size = man.drop_duplicates("sha256").set_index("sha256")[["width", "height"]].astype("float64")
    W, H = labels["sha256"].map(size["width"]), labels["sha256"].map(size["height"])
    x1, y1, x2, y2 = (labels[c].astype("float64") for c in ("x1", "y1", "x2", "y2"))
    outside = np.maximum.reduce([np.zeros(len(labels)), -x1, -y1, (x2 - W).fillna(0), (y2 - H).fillna(0)])
    lab = pd.DataFrame(
        {
            "sha256": labels["sha256"].astype(str).to_numpy(),
            "origin": labels["origin"].astype(object).to_numpy(),
            "x1": x1.to_numpy(),
            "y1": y1.to_numpy(),
            "x2": x2.to_numpy(),
            "y2": y2.to_numpy(),
            "short_side": np.minimum(x2 - x1, y2 - y1).to_numpy(),
            "outside_px": np.asarray(outside, dtype=np.float64),
            "image_known": W.notna().to_numpy(),
            "label_id": labels["label_id"].astype("int64").to_numpy(),
            "confidence": labels["confidence"].astype("float64").to_numpy(),
            "proposer_conf": labels["proposer_conf"].astype("float64").to_numpy(),
            "topk_sum": labels["topk_probs"].map(_list_sum).astype("float64").to_numpy(),
            "topk_n_ids": labels["topk_ids"].map(_list_len).astype("int64").to_numpy(),
            "topk_n_probs": labels["topk_probs"].map(_list_len).astype("int64").to_numpy(),
            "ref": (
                labels["sha256"].str[:12] + "#" + labels["box_id"].astype(str) + " " + labels["origin"].astype(str)
            ).to_numpy(),
        }
    )

    topk_parts = []
    for col, name in (("topk_ids", "class_id"), ("topk_probs", "prob")):
        arr = pa.array([None if v is None else list(v) for v in labels[col]], type=pa.list_(pa.float64()))
        flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
        parent = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        rank = np.arange(len(parent)) - np.searchsorted(parent, parent, side="left")
        topk_parts.append(pd.DataFrame({"row": parent, "rank": rank, name: flat}))
    topk = topk_parts[0].merge(topk_parts[1], on=["row", "rank"], how="outer")
    topk["ref"] = lab["ref"].to_numpy()[topk["row"].to_numpy(np.int64)] + " top-" + (topk["rank"] + 1).astype(str)
    topk = topk[["class_id", "prob", "ref"]].reset_index(drop=True)

    img = pd.DataFrame(
        {
            "sha256": images["sha256"].astype(str).to_numpy(),
            "split": images["split"].astype(object).to_numpy(),
            "n_boxes": images["n_boxes"].astype("int64").to_numpy(),
            "background": (images["n_boxes"] == 0).astype("float64").to_numpy(),
            "origin": images["label_origin"].astype(object).to_numpy(),
            "ref": (images["sha256"].str[:12] + " (" + images["split"].astype(str) + ")").to_numpy(),
        }
    )

    split_of = images.set_index("sha256")["split"]
    b = boxes.assign(split=boxes["sha256"].map(split_of))
    b = b[(b["label_id"] >= 0)]
    rows = []
    if len(b):
        per_box = b["label_id"].value_counts()
        top = int(per_box.max())
        for cid, n in per_box.sort_index().items():
            bc = b[b["label_id"] == cid]
            rows.append(
                {
                    "class_id": int(cid),
                    "name": f"{ontology.zh(int(cid))} ({ontology.en(int(cid))})"
                    if 0 <= cid < len(ontology)
                    else str(cid),
                    "boxes": int(n),
                    **{f"images_{s}": int(bc.loc[bc["split"] == s, "sha256"].nunique()) for s in SPLITS},
                    "imbalance": float(top) / float(n),
                }
            )
    classes = pd.DataFrame(
        rows, columns=["class_id", "name", "boxes", "images_train", "images_val", "images_test", "imbalance"]
    )
    classes["ref"] = classes["name"].astype(str)

    need = params.min_split_images
    n_split = images["split"].value_counts()
    splits = pd.DataFrame(
        [{"split": s, "images": int(n_split.get(s, 0)), "required": int(need.get(s, 0))} for s in SPLITS]
    )
    splits["surplus"] = splits["images"] - splits["required"]
    splits["ref"] = (
        splits["split"] + ": " + splits["images"].astype(str) + " images, needs " + splits["required"].astype(str)
    )

    words, valid = _phash_words(images["phash"]) if len(images) else (np.zeros((0, 1), np.uint64), np.zeros(0, bool))
    groups = pd.factorize(images["split"])[0] if len(images) else np.zeros(0, np.int64)
    dist, arg = nearest_other_group(words, valid, groups)
    sha = images["sha256"].astype(str).to_numpy()
    spl = images["split"].astype(str).to_numpy()
    leak = pd.DataFrame(
        {
            "sha256": sha,
            "split": spl,
            "distance": np.where(dist >= 0, dist, np.nan).astype(np.float64),
            "ref": [
                f"{s[:12]} ({sp}) ~ {sha[a][:12]} ({spl[a]})" if a >= 0 else f"{s[:12]} ({sp})"
                for s, sp, a in zip(sha, spl, arg, strict=True)
            ],
        }
    )

    dr = pd.DataFrame(drift, columns=["feature", "psi"])
    dr["ref"] = dr["feature"]
    return {
        "manifest": manifest,
        "labels": lab,
        "topk": topk,
        "images": img,
        "classes": classes,
        "splits": splits,
        "leakage": leak,
        "drift": dr,
    }


# ---- the expectations ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One expectation: the GE object, where it runs, and the words a user reads when it fails."""

    id: str
    table: str
    what: str
    threshold: str
    fix: str
    expectation: Any
    unit: str  # what a row is: images, boxes, classes, …
    columns: tuple[str, ...] = ()  # shown in examples
    worst: str | None = None  # "min" / "max": the observed extreme of columns[0]


def specs(params: QualityParams, ontology: Ontology) -> list[Spec]:
    """The suites: every threshold comes from params (``quality.*``), every id is named in messages and docs."""
    import great_expectations.expectations as gxe

    p = params
    ids = sorted([c.id for c in ontology.classes] + [OTHER_ID])
    ids_txt = f"ontology ids 0..{len(ontology) - 1} or −1 (other)"

    def e(cls: Any, check: str, what: str, **kw: Any) -> Any:
        return cls(meta={"check": check}, description=what, **kw)

    out: list[Spec] = []

    def add(
        id_: str, table: str, what: str, threshold: str, fix: str, cls: Any, unit: str, columns=(), worst=None, **kw
    ):
        out.append(Spec(id_, table, what, threshold, fix, e(cls, id_, what, **kw), unit, tuple(columns), worst))

    # manifest
    add(
        "manifest_sha_unique",
        "manifest",
        "every image appears once in the manifest",
        "unique sha256 (the manifest contract)",
        "re-run `wanwu stage collect` (it stores each picture once); a hand-edited manifest repeats rows",
        gxe.ExpectColumnValuesToBeUnique,
        "images",
        (),
        column="sha256",
    )
    add(
        "image_file_exists",
        "manifest",
        "every manifest image is on disk",
        "file exists under the data folder",
        "re-run `wanwu stage collect` to restore the files, or remove their manifest rows",
        gxe.ExpectColumnValuesToBeInSet,
        "images",
        ["path"],
        column="file_exists",
        value_set=[True],
    )
    add(
        "image_min_side",
        "manifest",
        "images are at least quality.min_image_side pixels on each side",
        f"quality.min_image_side = {p.min_image_side}",
        "drop the small images at the source, or lower quality.min_image_side",
        gxe.ExpectColumnValuesToBeBetween,
        "images",
        ["short_side"],
        "min",
        column="short_side",
        min_value=p.min_image_side,
    )
    add(
        "image_max_side",
        "manifest",
        "images are at most quality.max_image_side pixels on each side",
        f"quality.max_image_side = {p.max_image_side}",
        "downscale the huge images before collecting them, or raise quality.max_image_side",
        gxe.ExpectColumnValuesToBeBetween,
        "images",
        ["long_side"],
        "max",
        column="long_side",
        max_value=p.max_image_side,
    )
    add(
        "manifest_split_known",
        "manifest",
        "every image's role is gold, seed or pool",
        "split in {gold, seed, pool}",
        "re-run collect; set `role` of each source in params.yaml collect.sources to gold, seed or pool",
        gxe.ExpectColumnValuesToBeInSet,
        "images",
        ["split"],
        column="split",
        value_set=["gold", "pool", "seed"],
    )
    # labels
    add(
        "label_image_known",
        "labels",
        "every label belongs to an image in the manifest",
        "sha256 in the manifest",
        "re-run the stage that wrote the labels (autolabel) after collect: these boxes point at images not collected",
        gxe.ExpectColumnValuesToBeInSet,
        "boxes",
        (),
        column="image_known",
        value_set=[True],
    )
    add(
        "box_positive_width",
        "labels",
        "every box has a positive width",
        "x2 > x1",
        "fix the box coordinates at their source (an importer or the proposer wrote x2 ≤ x1)",
        gxe.ExpectColumnPairValuesAToBeGreaterThanB,
        "boxes",
        ["x2", "x1"],
        column_A="x2",
        column_B="x1",
    )
    add(
        "box_positive_height",
        "labels",
        "every box has a positive height",
        "y2 > y1",
        "fix the box coordinates at their source (an importer or the proposer wrote y2 ≤ y1)",
        gxe.ExpectColumnPairValuesAToBeGreaterThanB,
        "boxes",
        ["y2", "y1"],
        column_A="y2",
        column_B="y1",
    )
    add(
        "box_min_side",
        "labels",
        "boxes are at least quality.min_box_side pixels wide and high",
        f"quality.min_box_side = {p.min_box_side}",
        "remove the sliver boxes at their source, or lower quality.min_box_side",
        gxe.ExpectColumnValuesToBeBetween,
        "boxes",
        ["short_side"],
        "min",
        column="short_side",
        min_value=p.min_box_side,
    )
    add(
        "box_inside_image",
        "labels",
        "every box lies inside its image",
        f"at most quality.box_tolerance_px = {p.box_tolerance_px} pixels outside",
        "clip the boxes to the image where they are written (importer / proposer), or check that they use the "
        "stored (EXIF-oriented) image's pixels",
        gxe.ExpectColumnValuesToBeBetween,
        "boxes",
        ["outside_px"],
        "max",
        column="outside_px",
        max_value=p.box_tolerance_px,
    )
    add(
        "label_in_ontology",
        "labels",
        "every label id is an ontology class or −1 (other)",
        ids_txt,
        "map the label through Ontology.lookup (a class_map entry in params.yaml for imports); ids are never invented",
        gxe.ExpectColumnValuesToBeInSet,
        "boxes",
        ["label_id"],
        column="label_id",
        value_set=ids,
    )
    add(
        "confidence_range",
        "labels",
        "every label confidence is in [0, 1]",
        "0 ≤ confidence ≤ 1",
        "the autolabel fusion must output probabilities (check its temperature / normalisation)",
        gxe.ExpectColumnValuesToBeBetween,
        "boxes",
        ["confidence"],
        "max",
        column="confidence",
        min_value=0,
        max_value=1,
    )
    add(
        "proposer_conf_range",
        "labels",
        "every proposer confidence is in [0, 1]",
        "0 ≤ proposer_conf ≤ 1",
        "the proposer must report a probability (ultralytics' conf); check the proposer adapter",
        gxe.ExpectColumnValuesToBeBetween,
        "boxes",
        ["proposer_conf"],
        "max",
        column="proposer_conf",
        min_value=0,
        max_value=1,
    )
    add(
        "topk_sum",
        "labels",
        "each box's top-k probabilities sum to at most 1",
        f"sum ≤ 1 + quality.topk_sum_tolerance = {1 + p.topk_sum_tolerance:g}",
        "normalise the teacher's scores with a softmax over its whole label space before taking the top k",
        gxe.ExpectColumnValuesToBeBetween,
        "boxes",
        ["topk_sum"],
        "max",
        column="topk_sum",
        max_value=1 + p.topk_sum_tolerance,
    )
    add(
        "topk_lengths",
        "labels",
        "each box has as many top-k probabilities as top-k ids",
        "len(topk_ids) = len(topk_probs)",
        "write topk_ids and topk_probs from the same top-k call",
        gxe.ExpectColumnPairValuesToBeEqual,
        "boxes",
        ["topk_n_ids", "topk_n_probs"],
        column_A="topk_n_ids",
        column_B="topk_n_probs",
    )
    # top-k entries
    add(
        "topk_prob_range",
        "topk",
        "every top-k probability is in [0, 1]",
        "0 ≤ p ≤ 1",
        "the teacher adapter must output probabilities, not logits",
        gxe.ExpectColumnValuesToBeBetween,
        "top-k entries",
        ["prob"],
        "max",
        column="prob",
        min_value=0,
        max_value=1,
    )
    add(
        "topk_ids_in_ontology",
        "topk",
        "every top-k id is an ontology class or −1 (other)",
        ids_txt,
        "map the teacher's labels onto the ontology (Ontology.lookup_or_other) before writing them",
        gxe.ExpectColumnValuesToBeInSet,
        "top-k entries",
        ["class_id"],
        column="class_id",
        value_set=[float(i) for i in ids],
    )
    # dataset images
    add(
        "boxes_per_image",
        "images",
        "every dataset image has a plausible number of boxes",
        f"quality.min_boxes_per_image = {p.min_boxes_per_image} ≤ boxes per image ≤ "
        f"quality.max_boxes_per_image = {p.max_boxes_per_image}",
        "look at the image: a flood of boxes is usually a proposer without NMS; raise quality.max_boxes_per_image "
        "if the scenes really are that crowded",
        gxe.ExpectColumnValuesToBeBetween,
        "images",
        ["n_boxes"],
        "max",
        column="n_boxes",
        min_value=p.min_boxes_per_image,
        max_value=p.max_boxes_per_image,
    )
    add(
        "background_share",
        "images",
        "few dataset images have no box at all",
        f"share of images without boxes ≤ quality.max_background_share = {p.max_background_share:g}",
        "images without boxes teach the detector that whatever is in them is background: when they are auto-labeled "
        "pool images, the proposer found nothing or every box waits for review (look at data/autolabel/metrics.json, "
        "train the proposer longer, or review the queue); raise quality.max_background_share if the scenes really "
        "are empty",
        gxe.ExpectColumnMeanToBeBetween,
        "images",
        (),
        None,
        column="background",
        max_value=p.max_background_share,
    )
    # classes
    add(
        "min_classes",
        "classes",
        "the dataset has boxes of enough ontology classes",
        f"quality.min_classes = {p.min_classes}",
        "labels that map to no class become −1 (other) and are not trained on: add `class_map` entries to the "
        "source in params.yaml or classes to ontology.yaml",
        gxe.ExpectTableRowCountToBeBetween,
        "classes",
        (),
        None,
        min_value=p.min_classes,
    )
    add(
        "min_images_per_class",
        "classes",
        "every class in the dataset has enough training images",
        f"quality.min_images_per_class = {p.min_images_per_class}",
        "collect or label more images of these classes, or lower quality.min_images_per_class",
        gxe.ExpectColumnValuesToBeBetween,
        "classes",
        ["images_train"],
        "min",
        column="images_train",
        min_value=p.min_images_per_class,
    )
    add(
        "class_balance",
        "classes",
        "no class is rarer than the most frequent one by more than the bound",
        f"boxes(most frequent) / boxes(class) ≤ quality.max_class_imbalance = {p.max_class_imbalance:g}",
        "add images of the rare classes (or review the auto labels: a teacher that calls everything one class "
        "shows here), or raise quality.max_class_imbalance",
        gxe.ExpectColumnValuesToBeBetween,
        "classes",
        ["imbalance", "boxes"],
        "max",
        column="imbalance",
        max_value=p.max_class_imbalance,
    )
    # splits
    add(
        "split_sizes",
        "splits",
        "every split has the images it needs",
        "quality.min_split_images = " + ", ".join(f"{k}: {v}" for k, v in p.min_split_images.items()),
        "add images (ultralytics cannot train without a val split), or change quality.split_ratios",
        gxe.ExpectColumnValuesToBeBetween,
        "splits",
        (),
        "min",
        column="surplus",
        min_value=0,
    )
    # leakage
    add(
        "no_split_leakage",
        "leakage",
        "no image or near-duplicate of it sits in two splits",
        f"perceptual-hash distance to any image of another split > quality.near_dup_distance = {p.near_dup_distance}",
        "keep near-duplicates in one split (the stage groups them; this fires when the gold set and the rest "
        "share pictures that collect could not tell apart): remove the copies from one side",
        gxe.ExpectColumnValuesToBeBetween,
        "images",
        ["distance"],
        "min",
        column="distance",
        min_value=p.near_dup_distance + 1,
    )
    # drift
    add(
        "drift_psi",
        "drift",
        "no feature drifted from the last accepted dataset",
        f"PSI ≤ quality.drift_max_psi = {p.drift_max_psi:g}",
        "look at the drift plot: if the new data is right, accept it by raising quality.drift_max_psi for one run "
        "(the reference then moves to it); otherwise find what changed at the source",
        gxe.ExpectColumnValuesToBeBetween,
        "features",
        ["psi"],
        "max",
        column="psi",
        max_value=p.drift_max_psi,
    )
    return out


def _gx_context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["wanwu"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    cfg = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
        data_docs_sites=sites,
    )
    return gx.get_context(mode="ephemeral", project_config=cfg)


def validate(
    tables: dict[str, pd.DataFrame],
    params: QualityParams,
    ontology: Ontology,
    docs_dir: Path | None = None,
    only: Iterable[str] | None = None,
) -> list[CheckResult]:
    """Run the suites through great-expectations (ephemeral context; data docs into ``docs_dir`` if given).

    ``only`` restricts the run to some tables' suites (tests that break one table); the stage runs them all.
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    wanted = set(only) if only is not None else None
    all_specs = [s for s in specs(params, ontology) if wanted is None or s.table in wanted]
    ctx = _gx_context(docs_dir)
    source = ctx.data_sources.add_pandas("wanwu")
    by_table: dict[str, list[Spec]] = {}
    for s in all_specs:
        by_table.setdefault(s.table, []).append(s)
    results: dict[str, CheckResult] = {}
    for table, group in by_table.items():
        df = tables[table].reset_index(drop=True)
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(f"{table} table")
        suite = ctx.suites.add(
            gx.ExpectationSuite(name=f"quality.{table}", expectations=[s.expectation for s in group])
        )
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"quality.{table}", data=batch, suite=suite))
        res = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
        for r in res.results:
            check = (r.expectation_config.meta or {}).get("check")
            spec = next(s for s in group if s.id == check)
            results[check] = _describe(spec, r, df)
    if docs_dir is not None:
        ctx.build_data_docs(site_names=["wanwu"])
    return [results[s.id] for s in all_specs]


def _value(v: Any) -> str:
    if isinstance(v, float | np.floating):
        f = float(v)
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.4g}"
    if isinstance(v, tuple):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _describe(spec: Spec, r: Any, df: pd.DataFrame) -> CheckResult:
    """A GE result → observed value and examples in the user's terms."""
    res = r.result or {}
    exc = (r.exception_info or {}) if isinstance(r.exception_info, dict) else {}
    if exc.get("raised_exception"):
        observed = f"the check could not run: {exc.get('exception_message')}"
        return CheckResult(spec.id, spec.table, spec.what, False, observed, spec.threshold, spec.fix)
    examples: list[str] = []
    if "observed_value" in res and "unexpected_count" not in res:
        v = res["observed_value"]
        if spec.id == "background_share" and v is not None:
            n_bg = int(df["background"].sum())
            observed = f"{float(v):.1%} ({n_bg} of {len(df)} images have no box)"
            auto_bg = df[(df["background"] > 0) & (df.get("origin", pd.Series("", index=df.index)) == "auto")]
            if len(auto_bg):
                observed += f", {len(auto_bg)} of them auto-labeled"
        else:
            observed = f"{v} {spec.unit}"
    else:
        n_bad = int(res.get("unexpected_count") or 0)
        n = int(res.get("element_count") or 0)
        observed = f"{n_bad} of {n} {spec.unit} fail"
        column = getattr(spec.expectation, "column", None)
        if spec.worst and column and n:
            col = pd.to_numeric(df[column], errors="coerce").dropna()
            if len(col):
                lo = getattr(spec.expectation, "min_value", None)
                hi = getattr(spec.expectation, "max_value", None)
                if lo is not None and col.min() < lo:
                    which = "min"
                elif hi is not None and col.max() > hi:
                    which = "max"
                else:
                    which = spec.worst
                w = col.min() if which == "min" else col.max()
                observed += f" ({which} {column} = {_value(w)})"
        if not r.success:
            for i in (res.get("partial_unexpected_index_list") or [])[:10]:
                if isinstance(i, dict):
                    i = next(iter(i.values()), None)
                with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
                    row = df.iloc[int(i)]
                    vals = ", ".join(f"{c}={_value(row[c])}" for c in spec.columns)
                    text = f"{row['ref']}: {vals}" if vals else str(row["ref"])
                    if text not in examples:
                        examples.append(text)
            examples = examples[:5]
    return CheckResult(spec.id, spec.table, spec.what, bool(r.success), observed, spec.threshold, spec.fix, examples)


def gate(results: list[CheckResult], report: Path | None = None) -> None:
    """Raise QualityGateFailed when any expectation failed."""
    failures = [r for r in results if not r.success]
    if failures:
        raise QualityGateFailed(failures, len(results), report)


def check(
    inputs: Inputs,
    params: QualityParams,
    ontology: Ontology,
    reference: dict | None = None,
    docs_dir: Path | None = None,
    stats: pd.DataFrame | None = None,
    only: Iterable[str] | None = None,
) -> tuple[Analysis, list[CheckResult]]:
    """analyse + validate: what the stage runs before it writes anything."""
    analysis = analyse(inputs, params, ontology, reference, stats)
    return analysis, validate(analysis.tables, params, ontology, docs_dir, only)


# ---- outputs ----------------------------------------------------------------------------------------------------
def yolo_lines(boxes: pd.DataFrame, width: float, height: float) -> list[str]:
    """Pixel boxes → YOLO ``class cx cy w h`` lines, normalised and clipped to the image."""
    x1 = np.clip(boxes["x1"].to_numpy(np.float64), 0, width)
    x2 = np.clip(boxes["x2"].to_numpy(np.float64), 0, width)
    y1 = np.clip(boxes["y1"].to_numpy(np.float64), 0, height)
    y2 = np.clip(boxes["y2"].to_numpy(np.float64), 0, height)
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return [
        f"{int(c)} {a:.6f} {b:.6f} {d:.6f} {e:.6f}"
        for c, a, b, d, e in zip(boxes["label_id"].to_numpy(), cx, cy, w, h, strict=True)
    ]


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, dest)


def ignore_regions(auto_scored: pd.DataFrame, images: pd.DataFrame, reasons: Iterable[str]) -> pd.DataFrame:
    """Auto boxes left out for one of ``reasons`` on an auto-labeled train/val image: the spots to paint over.

    An object the labeler was unsure of is still an object; left in the picture without a label it would teach the
    student "background here". Detection datasets mark such spots as ignore regions (COCO's crowd, the WIDER FACE
    ignore boxes); ultralytics has no ignore label, so the dataset's copy of the image is painted there instead.
    """
    reasons = list(reasons)
    if auto_scored is None or auto_scored.empty or not reasons:
        return auto_scored.iloc[0:0] if auto_scored is not None else pd.DataFrame(columns=["sha256"])
    targets = images.loc[(images["label_origin"] == "auto") & images["split"].isin(["train", "val"]), "sha256"]
    picked = auto_scored["reason"].isin(reasons) & auto_scored["sha256"].isin(set(targets))
    return auto_scored.loc[picked, ["sha256", "x1", "y1", "x2", "y2"]].reset_index(drop=True)


IGNORE_FILL = 114  # ultralytics' letterbox grey: what the student already sees as "no content"


def _painted(src: Path, dest: Path, paint: pd.DataFrame, keep: pd.DataFrame) -> Path:
    """``src`` with the ``paint`` boxes filled grey, the ``keep`` boxes' pixels restored on top, as a lossless PNG."""
    from PIL import Image

    with Image.open(src) as im:
        arr = np.asarray(im.convert("RGB")).copy()
    orig = arr.copy()
    h, w = arr.shape[:2]

    def spans(df: pd.DataFrame) -> Iterable[tuple[int, int, int, int]]:
        for x1, y1, x2, y2 in df[["x1", "y1", "x2", "y2"]].to_numpy(np.float64):
            a, b = int(np.clip(np.floor(x1), 0, w)), int(np.clip(np.ceil(x2), 0, w))
            c, d = int(np.clip(np.floor(y1), 0, h)), int(np.clip(np.ceil(y2), 0, h))
            yield a, c, b, d

    for a, c, b, d in spans(paint):
        arr[c:d, a:b] = IGNORE_FILL
    for a, c, b, d in spans(keep):
        arr[c:d, a:b] = orig[c:d, a:b]
    dest = dest.with_suffix(".png")
    Image.fromarray(arr).save(dest, format="PNG", compress_level=1)
    return dest


def write_dataset(
    out_dir: Path,
    data_dir: Path,
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    ontology: Ontology,
    ignore: pd.DataFrame | None = None,
) -> Path:
    """The ultralytics dataset, built beside ``out_dir`` and swapped into place (never half-written).

    ``ignore`` (sha256, x1..y2 in pixels; :func:`ignore_regions`): those spots are painted grey in the dataset's
    copy of the image (a PNG beside the label file; the other images are hard links to ``raw/``)."""
    import yaml

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for s in SPLITS:
        (tmp / "images" / s).mkdir(parents=True)
        (tmp / "labels" / s).mkdir(parents=True)
    groups = {k: g for k, g in boxes.groupby("sha256", sort=False)}
    paint = {} if ignore is None or ignore.empty else {k: g for k, g in ignore.groupby("sha256", sort=False)}
    empty = boxes.iloc[0:0]
    for r in images.itertuples(index=False):
        dest = tmp / "images" / r.split / f"{r.sha256}.jpg"
        if r.sha256 in paint:
            _painted(Path(data_dir) / r.path, dest, paint[r.sha256], groups.get(r.sha256, empty))
        else:
            _link(Path(data_dir) / r.path, dest)
        lines = yolo_lines(groups.get(r.sha256, empty), float(r.width), float(r.height))
        (tmp / "labels" / r.split / f"{r.sha256}.txt").write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    spec = {
        "path": str(out_dir.resolve()),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "nc": len(ontology),
        "names": ontology.names_zh,
    }
    (tmp / "data.yaml").write_text(
        "# written by the quality stage: every label here passed its expectations\n"
        + yaml.safe_dump(spec, allow_unicode=True, sort_keys=False),
        encoding="utf-8",
    )
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return out_dir / "data.yaml"


def review_queue(
    label_scores: pd.DataFrame,
    boxes: pd.DataFrame,
    images: pd.DataFrame,
    ontology: Ontology,
    threshold: float,
    worst: int,
    out_dir: Path,
) -> tuple[Path, int]:
    """The worst-scored boxes (below ``threshold``, at most ``worst``) as a Label Studio import, one task per image.

    Written with the autolabel stage's exporter (:func:`wanwu.labeling.export_review`, the same format and
    ``config.xml``), so one import path (``labeling.import_review``) brings the answers back. Each task pre-fills
    all of the image's boxes; the suspicious ones are flagged and scored, and ``meta.suspects`` says why.
    Returns (tasks.json path, number of tasks).
    """
    from wanwu.labeling import export_review

    cols = ["sha256", "box_id", "origin", "label_id", "swap", "badloc", "score"]
    scores = label_scores if label_scores is not None and len(label_scores) else pd.DataFrame(columns=cols)
    bad = scores[scores["score"] < threshold].sort_values("score", kind="stable").head(max(worst, 0))
    key = set(zip(bad["sha256"], bad["box_id"].astype(int), strict=True))
    frame = boxes[boxes["sha256"].isin(set(bad["sha256"]))].copy()
    flagged = [(s, int(b)) in key for s, b in zip(frame["sha256"], frame["box_id"], strict=True)]
    score_of = {(s, int(b)): float(v) for s, b, v in zip(bad["sha256"], bad["box_id"], bad["score"], strict=True)}
    # the exporter takes auto boxes flagged needs_review, most doubtful (lowest confidence) first: give it ours
    frame["origin"] = "auto"
    frame["needs_review"] = np.asarray(flagged, dtype=bool)
    frame["confidence"] = np.asarray(
        [score_of.get((s, int(b)), 1.0) for s, b in zip(frame["sha256"], frame["box_id"], strict=True)],
        dtype=np.float64,
    )
    path = export_review(frame, images, ontology, Path(out_dir), model_version="wanwu-quality-cleanlab")
    tasks = json.loads(path.read_text(encoding="utf-8"))
    for t in tasks:
        sha = t["data"]["sha256"]
        g = bad[bad["sha256"] == sha]
        t["meta"] = {
            "source": "quality stage: cleanlab ObjectLab label-quality scores (0 = surely wrong)",
            "suspects": [
                {
                    "box": int(r.box_id),
                    "origin": r.origin,
                    "label": ontology.zh(int(r.label_id)),
                    "score": round(float(r.score), 4),
                    "issue": "class may be wrong" if r.swap <= r.badloc else "box may be misplaced",
                }
                for r in g.itertuples(index=False)
            ],
        }
    write_json(path, tasks)
    return path, len(tasks)


def figures(analysis: Analysis, ontology: Ontology, fig_dir: Path, params: QualityParams) -> dict[str, Path]:
    """The report's plots (matplotlib, Chinese class names): class histogram, box sizes, confidences, P/R, drift."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from wanwu.report import save_figure

    out: dict[str, Path] = {}
    colours = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
    boxes = analysis.boxes
    split_of = analysis.images.set_index("sha256")["split"]
    b = boxes.assign(split=boxes["sha256"].map(split_of))
    ids = [c.id for c in ontology.classes]

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(ids) + 2), 3.8))
    bottom = np.zeros(len(ids))
    for s in SPLITS:
        cnt = b[b["split"] == s]["label_id"].value_counts()
        vals = np.array([cnt.get(i, 0) for i in ids], dtype=float)
        ax.bar(range(len(ids)), vals, bottom=bottom, label=s, color=colours[s])
        bottom += vals
    other = int((analysis.dropped["reason"] == "other").sum())
    ax.set_xticks(range(len(ids)), [ontology.zh(i) for i in ids], rotation=45, ha="right")
    ax.set_ylabel("boxes")
    ax.set_title(f"类别分布 boxes per class (其他 other, not trained on: {other})")
    ax.legend()
    out["classes"] = save_figure(fig, fig_dir / "class_histogram.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    size = analysis.images.set_index("sha256")[["width", "height"]]
    for origin, g in boxes.groupby("origin"):
        area = g["sha256"].map(size["width"]) * g["sha256"].map(size["height"])
        rel = np.sqrt(((g["x2"] - g["x1"]) * (g["y2"] - g["y1"])).clip(lower=0) / area)
        ax.hist(rel.dropna(), bins=np.linspace(0, 1, 41), alpha=0.6, label=f"{origin} ({len(g)})")
    ax.set_xlabel("box size: √(box area / image area)")
    ax.set_ylabel("boxes")
    ax.set_title("框大小分布 box-size distribution")
    if len(boxes):
        ax.legend()
    out["box_sizes"] = save_figure(fig, fig_dir / "box_sizes.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    a = analysis.auto_scored
    if len(a):
        bins = np.linspace(0, 1, 41)
        ax.hist(a.loc[a["passes"], "confidence"].dropna(), bins=bins, alpha=0.7, label="passes the filters and NMS")
        ax.hist(
            a.loc[~a["passes"], "confidence"].dropna(),
            bins=bins,
            alpha=0.6,
            label="filtered out (review, other, duplicate)",
        )
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no auto labels", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("auto-label confidence")
    ax.set_ylabel("boxes")
    ax.set_title("置信度 auto-label confidence")
    out["confidence"] = save_figure(fig, fig_dir / "confidence.png")

    pr = analysis.pr.get("accepted") if analysis.pr else None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(ids) + 2), 3.6))
    if pr and pr.get("per_class"):
        per = pr["per_class"]
        keys = [k for k in map(str, ids) if k in per]
        x = np.arange(len(keys))
        prec = [per[k]["precision"] if per[k]["precision"] is not None else 0 for k in keys]
        rec = [per[k]["recall"] if per[k]["recall"] is not None else 0 for k in keys]
        ax.bar(x - 0.2, prec, 0.4, label="precision")
        ax.bar(x + 0.2, rec, 0.4, label="recall")
        ax.set_xticks(x, [ontology.zh(int(k)) for k in keys], rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(f"自动标注 auto labels vs {analysis.pr['reference']} (IoU ≥ {MATCH_IOU})")
    else:
        ax.text(
            0.5, 0.5, "no reference to measure auto labels against", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_title("自动标注 auto-label precision / recall")
    out["autolabel_pr"] = save_figure(fig, fig_dir / "autolabel_pr.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if analysis.drift:
        names = [r["feature"] for r in analysis.drift]
        vals = [r["psi"] for r in analysis.drift]
        ax.barh(names, vals, color=["#b3261e" if v > params.drift_max_psi else "#4c72b0" for v in vals])
        ax.axvline(
            params.drift_max_psi, color="k", ls="--", lw=1, label=f"quality.drift_max_psi = {params.drift_max_psi:g}"
        )
        ax.set_xlabel("PSI vs the last accepted dataset")
        ax.legend()
    else:
        ax.text(
            0.5,
            0.5,
            "first accepted run: no reference yet\n(this dataset becomes the reference)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_title("漂移 drift")
    out["drift"] = save_figure(fig, fig_dir / "drift.png")
    return out


def write_json(path: Path, obj: Any) -> Path:
    """JSON, atomically (temp file + rename)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def split_shares(images: pd.DataFrame, boxes: pd.DataFrame, ontology: Ontology) -> pd.DataFrame:
    """Per dominant class: images per split (the stratification figure)."""
    if boxes.empty:
        return pd.DataFrame(columns=["class", *SPLITS])
    dom = boxes[boxes["label_id"] >= 0].groupby("sha256")["label_id"].agg(lambda s: s.value_counts().index[0])
    im = images.assign(dominant=images["sha256"].map(dom)).dropna(subset=["dominant"])
    tab = pd.crosstab(im["dominant"].astype(int), im["split"]).reindex(columns=list(SPLITS), fill_value=0)
    tab.insert(0, "class", [ontology.zh(int(i)) for i in tab.index])
    return tab.reset_index(drop=True)


def champion_predictions(weights: Path, images: pd.DataFrame, data_dir: Path, imgsz: int | None = None) -> pd.DataFrame:
    """A detector checkpoint's boxes on ``images`` as labels-contract rows (class index = ontology id).

    Out of sample for the gold images and for anything added since the champion trained; in sample for the rest,
    which makes its scores optimistic there (it misses issues, it does not invent them).
    """
    from ultralytics import YOLO

    model = YOLO(str(weights))
    rows = []
    for r in images.itertuples(index=False):
        kw = {"imgsz": imgsz} if imgsz else {}  # default: the size it was trained at
        res = model.predict(str(Path(data_dir) / r.path), conf=0.05, verbose=False, **kw)[0]
        xyxy = res.boxes.xyxy.cpu().numpy()
        conf = res.boxes.conf.cpu().numpy()
        cls = res.boxes.cls.cpu().numpy().astype(int)
        for i in range(len(xyxy)):
            rows.append(
                {
                    "sha256": r.sha256,
                    "box_id": i,
                    "x1": float(xyxy[i, 0]),
                    "y1": float(xyxy[i, 1]),
                    "x2": float(xyxy[i, 2]),
                    "y2": float(xyxy[i, 3]),
                    "proposer": str(weights),
                    "proposer_conf": None,
                    "topk_ids": [int(cls[i])],
                    "topk_probs": [float(conf[i])],
                    "label_id": int(cls[i]),
                    "confidence": float(conf[i]),
                    "origin": "auto",
                    "needs_review": False,
                    "source_label": None,
                }
            )
    return pd.DataFrame(rows, columns=LABEL_COLS)


def write_report(
    analysis: Analysis,
    results: list[CheckResult],
    report_dir: Path,
    ontology: Ontology,
    params: QualityParams,
    *,
    root: Path,
    autolabel_metrics: dict | None = None,
    review_path: Path | None = None,
    docs_index: Path | None = None,
) -> Path:
    """Our page (plots, counts, P/R, drift, every expectation) beside great-expectations' data docs."""
    from wanwu.report import Section, badge, esc, kv_table, setup_plotting, table_html, write_page

    setup_plotting(root)
    report_dir = Path(report_dir)
    figs = figures(analysis, ontology, report_dir / "figures", params)
    passed = all(r.success for r in results)
    failures = [r for r in results if not r.success]
    c = analysis.counts
    links = {}
    if docs_index is not None and docs_index.is_file():
        links["great-expectations data docs"] = os.path.relpath(docs_index, report_dir).replace(os.sep, "/")

    verdict = badge(passed, "passed: the dataset was written" if passed else "failed: no dataset was written")
    body = f"<p>{verdict}</p>"
    if failures:
        body += "<ul>" + "".join(f"<li><b>{esc(f.id)}</b>: {esc(f.message())}</li>" for f in failures) + "</ul>"
    body += "".join(f"<p class='note'>{esc(n)}</p>" for n in analysis.notes)
    sections = [Section("Verdict", body)]

    counts_rows = [
        {"": "images", **c["images"], "total": c["images_total"]},
        {"": "boxes", **c["boxes"], "total": c["boxes_total"]},
    ]
    left = kv_table(
        {f"boxes left out: {k}": v for k, v in c["boxes_left_out"].items()}
        | {f"images left out: {k}": v for k, v in c["images_left_out"].items()}
        | {
            "background images (no boxes)": c["background_images"],
            "human duplicate boxes kept (drawn on purpose?)": c.get("human_duplicates_kept", 0),
            "pool images without labels": c.get("pool_unlabeled", 0),
        }
    )
    sections.append(
        Section(
            "Dataset",
            table_html(counts_rows, ["", *SPLITS, "total"]) + left,
            note="Human labels win over auto labels on the same image; boxes labeled 其他 (other) are counted, never "
            "trained on. Gold images are the test split.",
        )
    )

    exp_rows = [
        {
            "": badge(r.success, "ok" if r.success else "FAILED"),
            "expectation": r.id,
            "what": r.what,
            "observed": r.observed,
            "threshold": r.threshold,
            "table": r.table,
        }
        for r in results
    ]
    sections.append(Section("Expectations (great-expectations)", table_html(exp_rows, raw_columns=[""])))

    cls = analysis.tables["classes"].drop(columns=["ref"])
    sections.append(Section("Classes", table_html(cls), figures=[(figs["classes"], "boxes per class and split")]))
    shares = split_shares(analysis.images, analysis.boxes, ontology)
    sections.append(
        Section(
            "Splits",
            table_html(shares),
            note="Images per dominant class and split. Splits come from the image hash (stable when data is added); "
            "classes get the ratios in expectation, shown here.",
        )
    )
    sections.append(
        Section(
            "Boxes",
            "",
            figures=[(figs["box_sizes"], "box-size distribution"), (figs["confidence"], "auto-label confidence")],
        )
    )

    pr = analysis.pr or {}
    if pr.get("reference"):
        rows = []
        for name in ("all", "accepted"):
            d = pr[name]
            rows.append(
                {
                    "auto labels": name,
                    "precision": d["precision"],
                    "recall": d["recall"],
                    "tp": d["tp"],
                    "predicted": d["predicted"],
                    "reference": d["reference"],
                    "localisation P": d["localisation"]["precision"],
                    "localisation R": d["localisation"]["recall"],
                }
            )
        body = table_html(rows)
        per = pr["accepted"]["per_class"]
        body += table_html(
            [
                {"class": v["name"], **{k: v[k] for k in ("precision", "recall", "tp", "predicted", "reference")}}
                for v in per.values()
            ]
        )
        note = (
            f"Against {'the sample world truth' if pr['reference'] == 'truth' else 'the human gold labels'} on "
            f"{pr['images']} auto-labeled images, IoU ≥ {MATCH_IOU}; 'accepted' = the boxes that pass the filters "
            "and NMS. Measured only, never used to choose labels."
        )
    else:
        body, note = "", pr.get("note", "")
    if autolabel_metrics:
        body += "<h3>The autolabel stage's own figures (data/autolabel/metrics.json)</h3>"
        flat = {k: v for k, v in autolabel_metrics.items() if isinstance(v, int | float | str)}
        overall = (autolabel_metrics.get("precision_recall") or {}).get("overall")
        if isinstance(overall, dict):
            flat |= {f"precision_recall.overall.{k}": v for k, v in overall.items() if isinstance(v, int | float)}
        if flat:
            body += kv_table(flat)
        text = json.dumps(autolabel_metrics, ensure_ascii=False, indent=1, default=str)
        body += f"<details><summary>all of it</summary><pre>{esc(text)}</pre></details>"
    sections.append(
        Section("Auto-label precision and recall", body, figures=[(figs["autolabel_pr"], "per class")], note=note)
    )

    ls = analysis.label_scores
    if ls is not None and len(ls):
        worst = (
            ls.sort_values("score")
            .head(20)
            .assign(image=lambda d: d["sha256"].str[:12], label=lambda d: d["label_id"].map(ontology.zh))
        )
        body = kv_table(
            {
                "scored boxes": len(ls),
                f"likely issues (score < {params.label_issue_threshold:g})": int(
                    (ls["score"] < params.label_issue_threshold).sum()
                ),
                "review queue": str(review_path) if review_path else "—",
            }
        ) + table_html(worst, ["image", "box_id", "origin", "label", "swap", "badloc", "score"])
    else:
        body = ""
    sections.append(Section("Label issues (cleanlab ObjectLab)", body, note=f"Scored: {c.get('label_issue_source')}."))

    drift_body = table_html(analysis.drift) if analysis.drift else ""
    sections.append(
        Section(
            "Drift",
            drift_body,
            figures=[(figs["drift"], "PSI per feature")],
            note="Population stability index against data/quality/reference.json, the last accepted "
            f"dataset; > {params.drift_max_psi:g} fails (quality.drift_max_psi).",
        )
    )
    index = write_page(
        report_dir / "index.html",
        "万物 wanwu · quality report",
        sections,
        subtitle=f"{c['images_total']} images, {c['boxes_total']} boxes",
        links=links,
    )
    return index
