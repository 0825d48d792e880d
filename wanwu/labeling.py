"""The labeling engine: proposer boxes → crops → teachers → fusion → top-k, in shards streamed to Parquet.

Why it is built this way:

* **Batched**: one proposer forward pass per ``proposer.batch_size`` images and one teacher pass per
  ``batch`` crops (a per-crop loop spends its time in per-call overhead; see bench/bench_autolabel.py).
  Crops stay in memory (PIL), never in temp files.
* **Sharded, memory-bounded**: images are processed a shard at a time; each shard's result is one Parquet part
  file written atomically (temp file + rename), so memory holds one shard and a kill loses at most the shards
  in flight.
* **Cached by content**: parts live in ``parts/<proposer version>-<teacher version>/`` and record the image
  hashes they cover. The versions hash the weight files and every knob that changes the output, so re-labeling
  with unchanged models finds every image in the cache and calls no model; a new model gets a new folder.
* **Resumable and deterministic**: shards are fixed by the image hashes alone (hash-prefix buckets, then sorted
  chunks), so after a SIGKILL the missing shards are recomputed with exactly the batches an uninterrupted run
  would have used: the final rows are the same set.
* The merge (proposer class vs teacher label, confidence, ``needs_review``) runs when the parts are assembled
  into ``labels.parquet``: changing its thresholds calls no model either.

Nothing here imports Prefect: ``run_shards`` takes a ``map_fn`` (the autolabel task passes a Prefect fan-out on
threads or Dask; the default is a plain loop).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_serializer

from wanwu import contracts
from wanwu.models.fusion import Fusion, StackedModel
from wanwu.models.proposer import Proposals, Proposer, file_sha256
from wanwu.models.teachers import (
    CROP_CONTEXT,
    OntologyMapping,
    Teacher,
    build_teacher,
    project_all,
    square_crop,
    topk_ids,
)
from wanwu.ontology import OTHER_ID, Ontology

PART_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("idx", pa.int32()),  # box order within the image (confidence, then position)
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("proposer_label", pa.int32()),  # ontology id from a class-aware proposer, else -1
        ("proposer_conf", pa.float32()),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_probs", pa.list_(pa.float32())),
    ]
)
META_IMAGES = b"wanwu.images"
ENGINE_VERSION = "1"
"""Bumped when a code change alters what the same models output (preprocessing, crops): a new cache folder."""


class LabelingError(RuntimeError):
    """The labeling engine cannot go on; the message names the file and the fix."""


# ---- what to run -------------------------------------------------------------------------------------------


class ProposerSpec(BaseModel):
    weights: str
    imgsz: int | None = None
    conf: float = 0.1
    iou: float = 0.6
    max_det: int = 100
    class_aware: bool = True
    batch_size: int = 16
    augment: bool = False

    @model_serializer(mode="wrap")
    def _omit_augment_when_off(self, handler: Any) -> dict[str, Any]:
        # the labeling cache and the experts' fingerprint hash this dump: without TTA it stays what it was
        out = handler(self)
        if not self.augment:
            out.pop("augment", None)
        return out


class FusionSpec(BaseModel):
    strategy: str = "weighted"
    weights: list[float] | None = None
    meta: dict[str, Any] | None = None  # StackedModel.to_dict()
    temperature: float = Field(1.0, gt=0)  # calibration (fusion.fit_temperature); 1: none


class LabelerSpec(BaseModel):
    """Everything a worker (thread, process, Dask worker) needs to rebuild the models: files and knobs only."""

    data_dir: str
    ontology: str
    parts_dir: str
    proposer: ProposerSpec
    teachers: list[dict[str, Any]]
    fusion: FusionSpec = FusionSpec()
    topk: int = Field(5, ge=1)
    crop_context: float = Field(CROP_CONTEXT, ge=1.0)
    device: str = "auto"
    torch_threads: int | None = None
    proposer_name: str = "proposer"

    def versions(self) -> tuple[str, str]:
        """(proposer version, teacher version): content hashes of weights and knobs, no model loaded."""
        return _versions(self.model_dump_json())

    def version_dir(self) -> Path:
        pv, tv = self.versions()
        return Path(self.parts_dir) / f"{pv}-{tv}"


def teacher_files(spec: dict[str, Any]) -> list[Path]:
    """The files a teacher's output depends on (hashed into the teacher version)."""
    files: list[Path] = []
    path = spec.get("path")
    if path:
        p = Path(path)
        files += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    for key in ("labels", "config"):
        v = spec.get(key)
        if isinstance(v, str) and Path(v).is_file():
            files.append(Path(v))
    return files


_VERSION_CACHE: dict[str, tuple[str, str]] = {}


def _versions(spec_json: str) -> tuple[str, str]:
    if spec_json in _VERSION_CACHE:
        return _VERSION_CACHE[spec_json]
    spec = LabelerSpec.model_validate_json(spec_json)
    p = spec.proposer
    ph = hashlib.sha256(f"{ENGINE_VERSION}:{file_sha256(p.weights)}".encode())
    ph.update(json.dumps(p.model_dump(exclude={"weights", "batch_size"}), sort_keys=True).encode())
    th = hashlib.sha256(ENGINE_VERSION.encode())
    for t in spec.teachers:
        for f in teacher_files(t):
            th.update(file_sha256(f).encode())
        th.update(
            json.dumps({k: v for k, v in t.items() if k not in ("path", "batch")}, sort_keys=True, default=str).encode()
        )
    th.update(spec.fusion.model_dump_json().encode())
    th.update(
        json.dumps(
            {"topk": spec.topk, "crop_context": spec.crop_context, "ontology": file_sha256(spec.ontology)}
        ).encode()
    )
    out = (ph.hexdigest()[:12], th.hexdigest()[:12])
    _VERSION_CACHE[spec_json] = out
    return out


@dataclass
class Models:
    """The loaded models of one spec (one per process, shared by its threads)."""

    proposer: Proposer
    teachers: list[Teacher]
    mappings: list[OntologyMapping]
    fusion: Fusion
    topk: int
    crop_context: float

    def calls(self) -> int:
        return self.proposer.calls + sum(t.calls for t in self.teachers)


_MODELS: dict[str, Models] = {}
_MODELS_LOCK = threading.Lock()


def load_models(spec: LabelerSpec) -> Models:
    key = spec.model_dump_json()
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        ontology = Ontology.load(spec.ontology)
        proposer = Proposer(
            spec.proposer.weights, ontology, device=spec.device, **spec.proposer.model_dump(exclude={"weights"})
        )
        teachers = [build_teacher(t, ontology, device=spec.device) for t in spec.teachers]
        mappings = [OntologyMapping(t.labels, ontology) for t in teachers]
        meta = StackedModel.from_dict(spec.fusion.meta) if spec.fusion.meta else None
        fusion = Fusion(
            spec.fusion.strategy, [m.coverage for m in mappings], spec.fusion.weights, meta, spec.fusion.temperature
        )
        models = Models(proposer, teachers, mappings, fusion, spec.topk, spec.crop_context)
        _MODELS[key] = models
        return models


def forget_models() -> None:
    """Drop this process's loaded models (tests; a long-lived worker after a model change)."""
    with _MODELS_LOCK:
        _MODELS.clear()


# ---- the batched core --------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    proposals: Proposals
    topk_ids: np.ndarray  # (n, k)
    topk_probs: np.ndarray  # (n, k)


def teach(models: Models, crops: Sequence[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Crops → (fused (N, K+1), per-teacher projected outputs): each teacher sees the whole list, batched."""
    projected = project_all(models.teachers, models.mappings, crops)
    return models.fusion(projected), projected


def label_images(models: Models, images: Sequence[Any]) -> list[ImageResult]:
    """Batched: one proposer pass per batch of images, every crop of every image through each teacher in batches."""
    proposals = models.proposer.propose(images)
    crops = [
        square_crop(im, box, models.crop_context) for im, p in zip(images, proposals, strict=True) for box in p.xyxy
    ]
    if crops:
        fused, _ = teach(models, crops)
        ids, probs = topk_ids(fused, models.topk)
    else:
        ids, probs = np.zeros((0, models.topk), np.int32), np.zeros((0, models.topk), np.float32)
    out, start = [], 0
    for p in proposals:
        n = len(p)
        out.append(ImageResult(p, ids[start : start + n], probs[start : start + n]))
        start += n
    return out


def label_images_per_crop(models: Models, images: Sequence[Any]) -> list[ImageResult]:
    """The straightforward loop (autodistill's ComposedDetectionModel): one image, then one crop at a time
    through each model. Same models, same outputs up to float rounding; the benchmark's baseline."""
    out = []
    for im in images:
        (p,) = models.proposer.propose([im])
        rows_ids, rows_probs = [], []
        for box in p.xyxy:
            crop = square_crop(im, box, models.crop_context)
            projected = [
                m.project(t.predict_proba([crop])) for t, m in zip(models.teachers, models.mappings, strict=True)
            ]
            i, pr = topk_ids(models.fusion(projected), models.topk)
            rows_ids.append(i[0])
            rows_probs.append(pr[0])
        k = models.topk
        out.append(
            ImageResult(p, np.array(rows_ids, np.int32).reshape(-1, k), np.array(rows_probs, np.float32).reshape(-1, k))
        )
    return out


def open_image(data_dir: Path, relpath: str) -> Any:
    from PIL import Image

    with Image.open(data_dir / relpath) as im:
        return im.convert("RGB")


# ---- shards ------------------------------------------------------------------------------------------------


class Shard(BaseModel):
    name: str
    shas: list[str]
    paths: list[str]  # relative to data_dir


class ShardResult(BaseModel):
    name: str
    part: str
    images: int
    boxes: int
    model_calls: int
    seconds: float


def bucket_digits(n_images: int, shard_size: int) -> int:
    """Hex digits of the hash prefix that buckets images: buckets of at least ``shard_size`` images on average
    (0 digits: one bucket), so shards are full and a new image only reshuffles the bucket it falls in."""
    need = n_images / max(1, shard_size)
    return max(0, math.floor(math.log(need, 16))) if need >= 1 else 0


def make_shards(items: Sequence[tuple[str, str]], n_total: int, shard_size: int) -> list[Shard]:
    """Deterministic shards of (sha256, path) items: hash-prefix buckets, each sorted and cut into chunks.

    The split depends only on the hashes (and the total count), so a resumed run rebuilds exactly the shards an
    uninterrupted run would have had for whatever is still missing.
    """
    d = bucket_digits(n_total, shard_size)
    buckets: dict[str, list[tuple[str, str]]] = {}
    for sha, path in sorted(items):
        buckets.setdefault(sha[:d], []).append((sha, path))
    shards = []
    for prefix in sorted(buckets):
        rows = buckets[prefix]
        for start in range(0, len(rows), shard_size):
            chunk = rows[start : start + shard_size]
            shas = [s for s, _ in chunk]
            digest = hashlib.sha256("\n".join(shas).encode()).hexdigest()[:12]
            name = f"{prefix or 'all'}-{start // shard_size:04d}-{digest}"
            shards.append(Shard(name=name, shas=shas, paths=[p for _, p in chunk]))
    return shards


def cached_images(version_dir: Path) -> dict[str, Path]:
    """sha256 → part file, for every image a finished part in this version folder covers."""
    out: dict[str, Path] = {}
    if not version_dir.is_dir():
        return out
    for part in sorted(version_dir.glob("*.parquet")):
        try:
            meta = pq.read_schema(part).metadata or {}
        except (pa.ArrowInvalid, OSError):  # not ours or damaged: ignore it, its images are redone
            continue
        for sha in json.loads(meta.get(META_IMAGES, b"[]")):
            out.setdefault(sha, part)
    return out


def clean_stale_temps(version_dir: Path) -> int:
    """Remove temp files of writers that are gone (a killed run); a live writer's temp file is left alone."""
    n = 0
    for tmp in version_dir.glob(".*.tmp") if version_dir.is_dir() else []:
        parts = tmp.name.split(".")
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            pid = -1
        alive = pid == os.getpid()
        if pid > 0 and not alive:
            try:
                os.kill(pid, 0)
                alive = True
            except OSError:
                alive = False
        if not alive:
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def write_part(table: pa.Table, shas: Sequence[str], path: Path) -> Path:
    """Write a part atomically (temp file named by pid and thread, then rename); it records the images it covers."""
    table = table.replace_schema_metadata({META_IMAGES: json.dumps(list(shas)).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def results_to_table(shas: Sequence[str], results: Sequence[ImageResult]) -> pa.Table:
    cols: dict[str, list[Any]] = {n: [] for n in PART_SCHEMA.names}
    for sha, r in zip(shas, results, strict=True):
        p = r.proposals
        n = len(p)
        cols["sha256"] += [sha] * n
        cols["idx"] += list(range(n))
        for j, c in enumerate(("x1", "y1", "x2", "y2")):
            cols[c] += p.xyxy[:, j].tolist()
        cols["proposer_label"] += p.label.tolist()
        cols["proposer_conf"] += p.conf.tolist()
        cols["topk_ids"] += r.topk_ids.tolist()
        cols["topk_probs"] += r.topk_probs.tolist()
    return pa.table(cols, schema=PART_SCHEMA)


def label_shard(spec: LabelerSpec, shard: Shard) -> ShardResult:
    """Label one shard and write its part; a no-op when the part is already there (a retried task)."""
    t0 = time.perf_counter()
    part = spec.version_dir() / f"{shard.name}.parquet"
    if part.is_file():
        return ShardResult(
            name=shard.name,
            part=str(part),
            images=len(shard.shas),
            boxes=pq.read_metadata(part).num_rows,
            model_calls=0,
            seconds=0.0,
        )
    models = load_models(spec)
    before = models.calls()
    data_dir = Path(spec.data_dir)
    images = [open_image(data_dir, p) for p in shard.paths]
    results = label_images(models, images)
    table = results_to_table(shard.shas, results)
    write_part(table, shard.shas, part)
    return ShardResult(
        name=shard.name,
        part=str(part),
        images=len(shard.shas),
        boxes=table.num_rows,
        model_calls=models.calls() - before,
        seconds=time.perf_counter() - t0,
    )


MapFn = Callable[[LabelerSpec, list[Shard]], list[ShardResult]]


def serial_map(spec: LabelerSpec, shards: list[Shard], progress: bool = True) -> list[ShardResult]:
    """The plain loop (no Prefect): one shard after another, with a progress bar in images."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(
        total=sum(len(s.shas) for s in shards), desc="autolabel", unit="img", disable=not progress or None
    ) as bar:
        for s in shards:
            out.append(label_shard(spec, s))
            bar.update(len(s.shas))
    return out


@dataclass
class RunStats:
    images: int = 0
    cached_images: int = 0
    labeled_images: int = 0
    shards: int = 0
    boxes: int = 0
    model_calls: int = 0
    seconds: float = 0.0
    version_dir: str = ""
    results: list[ShardResult] = field(default_factory=list)


def run_shards(
    spec: LabelerSpec,
    items: Sequence[tuple[str, str]],
    shard_size: int = 64,
    map_fn: MapFn | None = None,
) -> RunStats:
    """Label every (sha256, path) item not yet in the cache; return what was done."""
    t0 = time.perf_counter()
    vdir = spec.version_dir()
    vdir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(vdir)
    (vdir / "spec.json").write_text(spec.model_dump_json(indent=1))
    cached = cached_images(vdir)
    unique = dict(items)
    todo = [(s, p) for s, p in unique.items() if s not in cached]
    shards = make_shards(todo, len(unique), shard_size)
    results = (map_fn or serial_map)(spec, shards) if shards else []
    return RunStats(
        images=len(unique),
        cached_images=len(unique) - len(todo),
        labeled_images=len(todo),
        shards=len(shards),
        boxes=sum(r.boxes for r in results),
        model_calls=sum(r.model_calls for r in results),
        seconds=time.perf_counter() - t0,
        version_dir=str(vdir),
        results=results,
    )


# ---- merge and assembly ------------------------------------------------------------------------------------


def merge(
    parts: pd.DataFrame, teacher_threshold: float = 0.5, review_threshold: float = 0.5, proposer: str = "proposer"
) -> pd.DataFrame:
    """Part rows → labels-contract rows (origin auto).

    The teacher's top label wins when its probability is at least ``teacher_threshold`` or when the proposer has
    no class for the box; otherwise the proposer's class stands. Confidence: the winner's probability, raised
    (noisy-or) when both agree. ``needs_review``: the teacher's top probability is under ``review_threshold``, or
    the proposer overruled the teacher.
    """
    if parts.empty:
        return contracts.empty("labels")
    t_id = np.array([v[0] for v in parts["topk_ids"]], np.int32)
    t_p = np.array([v[0] for v in parts["topk_probs"]], np.float32)
    p_lab = parts["proposer_label"].to_numpy(np.int32)
    p_conf = parts["proposer_conf"].to_numpy(np.float32)
    teacher_wins = (t_p >= teacher_threshold) | (p_lab < 0)
    agree = p_lab == t_id
    label = np.where(teacher_wins, t_id, p_lab)
    conf = np.where(teacher_wins, np.where(agree, 1 - (1 - t_p) * (1 - p_conf), t_p), p_conf)
    review = (t_p < review_threshold) | (~teacher_wins & ~agree)
    out = pd.DataFrame(
        {
            "sha256": parts["sha256"].to_numpy(),
            "box_id": parts["idx"].to_numpy(np.int32),
            "x1": parts["x1"].to_numpy(np.float32),
            "y1": parts["y1"].to_numpy(np.float32),
            "x2": parts["x2"].to_numpy(np.float32),
            "y2": parts["y2"].to_numpy(np.float32),
            "proposer": proposer,
            "proposer_conf": p_conf,
            "topk_ids": list(parts["topk_ids"]),
            "topk_probs": list(parts["topk_probs"]),
            "label_id": label.astype(np.int32),
            "confidence": conf.astype(np.float32),
            "origin": "auto",
            "needs_review": review,
            "source_label": None,
        }
    )
    return out


def assemble(
    version_dir: Path,
    shas: Iterable[str],
    out_path: Path,
    *,
    teacher_threshold: float = 0.5,
    review_threshold: float = 0.5,
    proposer: str = "proposer",
    reviewed: Reviewed | None = None,
) -> dict[str, int]:
    """Stream the parts covering ``shas`` into one contract-checked labels table, a part at a time.

    Images in ``reviewed`` (human labels imported from the review queue) take those rows instead of their auto
    labels: a human answer wins. Written atomically.
    """
    wanted = set(shas)
    cached = cached_images(version_dir)
    missing = wanted - set(cached)
    if missing:
        raise LabelingError(
            f"{version_dir}: {len(missing)} image(s) have no part (e.g. {sorted(missing)[:2]}); run the labeling first."
        )
    reviewed = reviewed or Reviewed.none()
    human = reviewed.labels[reviewed.labels["sha256"].isin(wanted)]
    human_shas = reviewed.images & wanted
    by_part: dict[Path, list[str]] = {}
    for sha in sorted(wanted):
        by_part.setdefault(cached[sha], []).append(sha)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.{os.getpid()}.tmp"
    stats = {"images": len(wanted), "auto_boxes": 0, "human_boxes": 0, "reviewed_images": len(human_shas)}
    writer = pq.ParquetWriter(tmp, contracts.SCHEMAS["labels"])
    try:
        for part in sorted(by_part):
            keep = set(by_part[part]) - human_shas
            df = pq.read_table(part).to_pandas()
            df = df[df["sha256"].isin(keep)].sort_values(["sha256", "idx"], kind="stable")
            if df.empty:
                continue
            merged = merge(df, teacher_threshold, review_threshold, proposer)
            writer.write_table(contracts.to_table("labels", merged))
            stats["auto_boxes"] += len(merged)
        if not human.empty:
            writer.write_table(contracts.to_table("labels", human.sort_values(["sha256", "box_id"])))
            stats["human_boxes"] = len(human)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats


# ---- review queue (Label Studio) ---------------------------------------------------------------------------


def label_studio_config(ontology: Ontology) -> str:
    """The labeling interface: one rectangle tool with every class's Chinese name (and 其他)."""
    names = [*ontology.names_zh.values(), ontology.zh(OTHER_ID)]
    labels = "\n".join(f'    <Label value="{n}"/>' for n in names)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n  <RectangleLabels name="label" toName="image">\n'
        f"{labels}\n  </RectangleLabels>\n</View>\n"
    )


def export_review(
    labels: pd.DataFrame,
    manifest: pd.DataFrame,
    ontology: Ontology,
    out_dir: Path,
    *,
    image_root: str = "/data/local-files/?d=",
    max_tasks: int | None = None,
    model_version: str = "wanwu-autolabel",
) -> Path:
    """Label Studio import JSON for every image with a box that needs review, most uncertain first.

    Each task carries all of the image's auto boxes as a prediction (percent coordinates, Chinese names), so the
    reviewer corrects the whole image; ``data.sha256`` ties the answer back to the image on import.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    auto = labels[labels["origin"] == "auto"]
    flagged = auto[auto["needs_review"]]
    order = flagged.groupby("sha256")["confidence"].min().sort_values(kind="stable")
    shas = list(order.index[: max_tasks if max_tasks is not None else None])
    m = manifest.set_index("sha256")[["path", "width", "height"]].to_dict("index")
    chosen = set(shas)
    per_image = {s: g for s, g in auto[auto["sha256"].isin(chosen)].groupby("sha256", sort=False)}
    tasks = []
    for sha in shas:
        row = m[sha]
        w, h = float(row["width"]), float(row["height"])
        boxes = per_image[sha].sort_values("box_id")
        result = []
        for b in boxes.itertuples():
            result.append(
                {
                    "id": f"{sha[:10]}_{b.box_id}",
                    "type": "rectanglelabels",
                    "from_name": "label",
                    "to_name": "image",
                    "original_width": int(w),
                    "original_height": int(h),
                    "image_rotation": 0,
                    "value": {
                        "x": 100 * float(b.x1) / w,
                        "y": 100 * float(b.y1) / h,
                        "width": 100 * float(b.x2 - b.x1) / w,
                        "height": 100 * float(b.y2 - b.y1) / h,
                        "rotation": 0,
                        "rectanglelabels": [ontology.zh(int(b.label_id))],
                    },
                    "score": round(float(b.confidence), 4),
                }
            )
        tasks.append(
            {
                "data": {"image": f"{image_root}{row['path']}", "sha256": sha},
                "predictions": [
                    {"model_version": model_version, "score": round(float(order[sha]), 4), "result": result}
                ],
            }
        )
    path = out_dir / "tasks.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    (out_dir / "config.xml").write_text(label_studio_config(ontology), encoding="utf-8")
    return path


def _rect_to_box(v: dict[str, Any], w: float, h: float) -> tuple[float, float, float, float]:
    x, y = float(v["x"]) * w / 100, float(v["y"]) * h / 100
    bw, bh = float(v["width"]) * w / 100, float(v["height"]) * h / 100
    rot = math.radians(float(v.get("rotation") or 0.0))
    if abs(rot) < 1e-9:
        return x, y, x + bw, y + bh
    c, s = math.cos(rot), math.sin(rot)  # Label Studio rotates around the top-left corner
    xs = [x + dx * c - dy * s for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    ys = [y + dx * s + dy * c for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    return min(xs), min(ys), max(xs), max(ys)


@dataclass
class Reviewed:
    """Human answers from the review queue: their boxes, and every image they cover (some may have no box)."""

    labels: pd.DataFrame
    images: set[str]

    @classmethod
    def none(cls) -> Reviewed:
        return cls(contracts.empty("labels"), set())

    def update(self, newer: Reviewed) -> Reviewed:
        """A newer review of an image replaces the older one whole."""
        old = self.labels[~self.labels["sha256"].isin(newer.images)]
        frames = [f for f in (old, newer.labels) if not f.empty]
        labels = pd.concat(frames, ignore_index=True) if frames else contracts.empty("labels")
        return Reviewed(labels, self.images | newer.images)


def import_review(export_json: Path, manifest: pd.DataFrame, ontology: Ontology) -> Reviewed:
    """A Label Studio JSON export → human labels (contract ``labels``, origin human) for the reviewed images.

    Per task the newest annotation that was not cancelled counts (an empty one means "no objects here"); names
    are looked up in the ontology (unknown names become −1, ``source_label`` keeps what was written); boxes are
    clipped to the image.
    """
    export_json = Path(export_json)
    try:
        tasks = json.loads(export_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LabelingError(f"{export_json}: not a Label Studio JSON export ({e}). Export with format JSON.") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    m = manifest.set_index("sha256")
    rows: list[dict[str, Any]] = []
    images: set[str] = set()
    for task in tasks:
        data = task.get("data") or {}
        sha = data.get("sha256") or Path(str(data.get("image", "")).split("?d=")[-1]).stem
        if sha not in m.index:
            raise LabelingError(
                f"{export_json}: task {task.get('id')} names image {sha!r}, which is not in the manifest."
            )
        anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not anns:
            continue
        ann = max(anns, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
        w, h = float(m.loc[sha, "width"]), float(m.loc[sha, "height"])
        images.add(sha)
        box_id = 0
        for r in ann.get("result") or []:
            if r.get("type") != "rectanglelabels":
                continue
            v = r["value"]
            names = v.get("rectanglelabels") or []
            name = names[0] if names else ""
            label_id = ontology.lookup_or_other(name) if name else OTHER_ID
            x1, y1, x2, y2 = _rect_to_box(v, float(r.get("original_width") or w), float(r.get("original_height") or h))
            x1, x2 = max(0.0, min(x1, w)), max(0.0, min(x2, w))
            y1, y2 = max(0.0, min(y1, h)), max(0.0, min(y2, h))
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            rows.append(
                {
                    "sha256": sha,
                    "box_id": box_id,
                    "x1": x1,
                    "y1": y1,
                    "x2": x2,
                    "y2": y2,
                    "proposer": "human",
                    "proposer_conf": 1.0,
                    "topk_ids": [label_id],
                    "topk_probs": [1.0],
                    "label_id": label_id,
                    "confidence": 1.0,
                    "origin": "human",
                    "needs_review": False,
                    "source_label": name,
                }
            )
            box_id += 1
    if not rows:
        return Reviewed(contracts.empty("labels"), images)
    table = contracts.to_table("labels", pd.DataFrame(rows))
    return Reviewed(table.to_pandas(), images)


# ---- measuring against the truth ---------------------------------------------------------------------------


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _greedy(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray, thr: float) -> int:
    """True positives: predictions by confidence, each to the best unmatched truth box with IoU ≥ thr."""
    if len(pred) == 0 or len(truth) == 0:
        return 0
    ious = iou_matrix(pred, truth)
    used = np.zeros(len(truth), bool)
    tp = 0
    for i in np.argsort(-conf, kind="stable"):
        cand = np.where(~used & (ious[i] >= thr))[0]
        if len(cand):
            used[cand[np.argmax(ious[i, cand])]] = True
            tp += 1
    return tp


def _by_image(df: pd.DataFrame, with_conf: bool) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """sha256 → (boxes, label ids, confidences) as numpy arrays, split once (not one DataFrame filter per image)."""
    if df.empty:
        return {}
    df = df.sort_values("sha256", kind="stable")
    shas = df["sha256"].to_numpy()
    boxes = df[["x1", "y1", "x2", "y2"]].to_numpy(float)
    ids = df["label_id"].to_numpy(int)
    conf = df["confidence"].to_numpy(float) if with_conf else np.ones(len(df))
    starts = np.flatnonzero(np.r_[True, shas[1:] != shas[:-1]])
    ends = np.r_[starts[1:], len(df)]
    return {shas[a]: (boxes[a:b], ids[a:b], conf[a:b]) for a, b in zip(starts, ends, strict=True)}


def precision_recall(labels: pd.DataFrame, truth: pd.DataFrame, ontology: Ontology, iou: float = 0.5) -> dict[str, Any]:
    """Auto-label precision and recall against the truth: a hit needs IoU ≥ ``iou`` and the right class.

    Only boxes labeled with an ontology class count as predictions ("other" boxes are no claim); truth boxes of
    distractors (−1) are not to be found. Also: localisation recall (any truth box, any class, IoU ≥ iou), i.e.
    what the proposer alone finds.
    """
    shas = sorted(set(labels["sha256"]) | set(truth["sha256"]))
    lab, tru = _by_image(labels, with_conf=True), _by_image(truth, with_conf=False)
    k = len(ontology)
    tp, npred, ntrue = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
    loc_tp = loc_true = 0
    none = (np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))
    for s in shas:
        pb, pl, pc = lab.get(s, none)
        tb, tl, _ = tru.get(s, none)
        loc_tp += _greedy(pb, pc, tb, iou)
        loc_true += len(tb)
        for c in set(pl[pl >= 0].tolist()) | set(tl[tl >= 0].tolist()):
            pm, tm = pl == c, tl == c
            npred[c] += int(pm.sum())
            ntrue[c] += int(tm.sum())
            tp[c] += _greedy(pb[pm], pc[pm], tb[tm], iou)

    def pr(t: int, np_: int, nt: int) -> dict[str, Any]:
        return {
            "precision": round(t / np_, 4) if np_ else None,
            "recall": round(t / nt, 4) if nt else None,
            "tp": int(t),
            "predicted": int(np_),
            "truth": int(nt),
        }

    return {
        "iou": iou,
        "images": len(shas),
        "overall": pr(tp.sum(), npred.sum(), ntrue.sum()),
        "per_class": {ontology.zh(c): pr(tp[c], npred[c], ntrue[c]) for c in range(k)},
        "localisation_recall": round(loc_tp / loc_true, 4) if loc_true else None,
    }
