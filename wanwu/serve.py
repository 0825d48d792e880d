"""`wanwu serve`: the champion detector behind HTTP, micro-batched, hot-swapped, measured.

- ``POST /recognize``: one or more images as multipart field ``images``; boxes in pixels with the Chinese and
  English names of their ontology class and confidences.
- ``GET /health``: readiness and the model version being served (503 until a model is loaded).
- ``GET /metrics``: Prometheus counters and histograms (requests, latency, errors, batch sizes, model version).
- ``GET /openapi.json``, ``/docs``: the schema the fuzz test drives the API from.

How a request flows: the handler checks the limits (token, content type, sizes, pixel count), decodes and resizes
its images in a decode thread (OpenCV releases the GIL, so requests decode in parallel), which queues one job. A
free inference thread takes queued jobs into a batch (up to ``max_batch`` images, waiting at most
``batch_window_ms`` for company; one batch gathers at a time) and runs it: one padded array, one onnxruntime call,
vectorised decoding (see :mod:`wanwu.onnx_model`); the answers go back to the event loop in one callback per batch.
With ``serve.threads`` at 0 there is one inference thread per core, each running single-threaded onnxruntime
calls: a small detector's operators are too short to split across cores without the threads waiting on each other
at every one, so whole batches side by side use the cores better than one batch at a time over all of them
(:func:`inference_threads`). Batches stay small (``max_batch``, 4 by default): clients send their next request
only when the last one is answered, so one batch that took every waiting request would leave the other inference
threads idle and nothing gathering for the next call. With 8 clients on 2 cores, 4 images a call answered 194-205
requests/s and 8 only 132-134 (params.yaml).
uvicorn runs on uvloop and httptools (installed with the project), which take less CPU per request than asyncio's
loop and h11.

Hot reload: a watcher polls the model source (the registry alias, or the file) every ``reload_interval`` s. A new
version is downloaded and loaded beside the old one and warmed up; then one reference is swapped. A batch reads
the reference once when it starts, so batches in flight finish on the old session and no request fails; the old
session is freed when the last batch holding it ends. A version that fails to load is not retried until it
changes; the old model keeps serving. Before the first model serves, the heap is collected and frozen
(``gc.freeze``), so that Python's full collections, which a swap's allocations tend to trigger, no longer walk the
libraries' objects with the GIL held and every request stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from wanwu.config import ServeParams, usable_cores
from wanwu.images import pil_open
from wanwu.models.teachers import CROP_CONTEXT
from wanwu.onnx_model import Detections, OnnxDetector, Prepared, find_onnx, reduced_jpeg_factor
from wanwu.ontology import OTHER_EN, OTHER_ID, OTHER_ZH, Ontology

if TYPE_CHECKING:
    from wanwu.config import Params

log = logging.getLogger("wanwu.serve")


# ---- errors --------------------------------------------------------------------------------------------------
class ServeError(RuntimeError):
    """The server cannot start (no model source, a bad teacher spec); the message names the setting and the fix."""


class ApiError(Exception):
    """A refused request: becomes a JSON answer naming the field, the limit and what was seen."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        limit: Any = None,
        observed: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.limit, self.observed, self.headers = field, limit, observed, headers

    def body(self) -> dict[str, Any]:
        return {
            "detail": self.message,
            "code": self.code,
            "field": self.field,
            "limit": self.limit,
            "observed": self.observed,
        }


# ---- response schemas (what /openapi.json documents and the fuzz test checks) ---------------------------------
class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong and how to fix it")
    code: str = Field(description="machine-readable reason, e.g. too_large, unsupported_media_type, undecodable")
    field: str | None = Field(None, description="the request field or header at fault, e.g. images[0]")
    limit: int | float | str | list[str] | None = Field(None, description="the limit that applies")
    observed: int | float | str | None = Field(None, description="what the request had")


class BoxOut(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    confidence: float = Field(description="the detector's confidence for the box")
    class_id: int = Field(description="ontology id; -1 = other (no ontology class)")
    label_zh: str
    label_en: str
    source: Literal["detector", "teacher"] = Field(description="who named the box (teacher: cascade)")
    teacher_confidence: float | None = Field(None, description="the teacher's probability for the label (cascade)")


class ImageOut(BaseModel):
    filename: str | None
    width: int
    height: int
    boxes: list[BoxOut]


class RecognizeOut(BaseModel):
    model_version: str
    images: list[ImageOut]
    elapsed_ms: float


class HealthOut(BaseModel):
    status: Literal["ready", "loading"]
    ready: bool
    model_version: str | None
    model_source: str
    model_path: str | None
    loaded_at: str | None
    classes: int | None
    imgsz: list[int] | None
    cascade: bool
    last_error: str | None


# ---- model sources -------------------------------------------------------------------------------------------
class ModelSource(Protocol):
    """Where the served model comes from. ``poll`` is cheap and says which version is current (None: nothing yet)."""

    description: str

    def poll(self) -> str | None: ...

    def fetch(self, version: str) -> Path: ...


class FileSource:
    """An .onnx file; its version is its content hash. Replace it atomically (write elsewhere, then ``mv``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.description = f"file {self.path}"
        self._sig: tuple[int, int, int] | None = None
        self._version: str | None = None

    def poll(self) -> str | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig != self._sig:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._sig, self._version = sig, f"sha256:{h.hexdigest()[:12]}"
        return self._version

    def fetch(self, version: str) -> Path:
        return self.path


class RegistrySource:
    """The model version an alias points to in the MLflow registry, downloaded once per version into a cache."""

    def __init__(self, name: str, alias: str, cache_dir: str | Path, tracking_uri: str | None = None) -> None:
        self.name, self.alias = name, alias
        self.cache_dir = Path(cache_dir)
        self.tracking_uri = tracking_uri
        self.description = f"registry models:/{name}@{alias}"
        self._client: Any = None

    def _mlflow_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def poll(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._mlflow_client().get_model_version_by_alias(self.name, self.alias)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(e):
                return None  # no champion yet: not ready, keep polling
            raise
        return str(mv.version)

    def fetch(self, version: str) -> Path:
        import mlflow

        dst = self.cache_dir / self.name / version
        if dst.is_dir():
            with contextlib.suppress(Exception):
                return find_onnx(dst)
        tmp = dst.with_name(f".{version}.{os.getpid()}.{threading.get_ident()}")
        tmp.mkdir(parents=True, exist_ok=True)
        # wanwu.registry registers a pyfunc (ONNX + PyTorch weights) and logs the bare ONNX flavour beside it,
        # naming it in the version tag wanwu.onnx_model_uri: fetch only that when it is there.
        tags = self._mlflow_client().get_model_version(self.name, version).tags or {}
        uri = tags.get("wanwu.onnx_model_uri") or f"models:/{self.name}/{version}"
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=self.tracking_uri)
        find_onnx(tmp)  # fail before publishing a folder without a model
        if dst.exists():  # a stale partial folder from an older run
            import shutil

            shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return find_onnx(dst)


# ---- labels and the cascade ----------------------------------------------------------------------------------
Label = tuple[int, str, str]  # ontology id, Chinese, English


def class_labels(names: dict[int, str], ontology: Ontology | None) -> dict[int, Label]:
    """Model class index → ontology id and both names. Names are looked up (any language, synonyms), not compared."""
    out: dict[int, Label] = {}
    for idx, name in names.items():
        oid = ontology.lookup_or_other(name) if ontology is not None else OTHER_ID
        if oid == OTHER_ID:
            out[idx] = (OTHER_ID, name, name)  # unknown to the ontology: say what the model says
        else:
            out[idx] = (oid, ontology.zh(oid), ontology.en(oid))
    return out


Teacher = Any  # an object with predict_proba(crops) or a callable: list[PIL RGB image] → (n, K) probabilities


class Cascade:
    """Low-confidence boxes re-named by a teacher on their crops; answers cached by the crop's content hash.

    The teacher returns probabilities over ontology ids (columns 0..K-1); a column beyond the ontology (the
    autolabel fusion's column K) means "other". Crops are squares of ``context`` × the box's longer side, shifted
    inside the image where they fit; ``context`` None: the teacher's own (autolabel's fused teacher carries the
    ``autolabel.crop_context`` it was trained and fused at), else autolabel's default.
    """

    def __init__(
        self,
        teacher: Teacher,
        threshold: float,
        ontology: Ontology,
        cache_size: int = 4096,
        context: float | None = None,
    ) -> None:
        fn = getattr(teacher, "predict_proba", teacher)
        if not callable(fn):
            raise ServeError("the cascade teacher must have predict_proba(crops) or be callable on a list of crops")
        self.fn: Callable[[list[Any]], Any] = fn
        self.threshold = float(threshold)
        self.ontology = ontology
        self.cache_size = int(cache_size)
        self.context = float(context if context is not None else getattr(teacher, "context", CROP_CONTEXT))
        self._cache: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def crop(self, img: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """Square crop around a box (zero padding where it leaves the image); None for a degenerate box."""
        h, w = img.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 - x1 < 1 or y2 - y1 < 1:
            return None
        side = max(x2 - x1, y2 - y1, 2.0) * self.context
        left, top = (x1 + x2) / 2 - side / 2, (y1 + y2) / 2 - side / 2
        if side <= w:
            left = min(max(left, 0.0), w - side)
        if side <= h:
            top = min(max(top, 0.0), h - side)
        cl, ct, cr, cb = round(left), round(top), round(left + side), round(top + side)
        out = np.zeros((cb - ct, cr - cl, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(cl, 0), max(ct, 0), min(cr, w), min(cb, h)
        out[sy1 - ct : sy2 - ct, sx1 - cl : sx2 - cl] = img[sy1:sy2, sx1:sx2]
        return out

    @staticmethod
    def _key(crop: np.ndarray) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(crop.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(crop).tobytes())
        return h.digest()

    def relabel(
        self, originals: Sequence[np.ndarray], dets: Sequence[Detections]
    ) -> list[list[tuple[int, float] | None]]:
        """For each image and box: None (kept) or (ontology id, teacher probability)."""
        from PIL import Image

        answers: list[list[tuple[int, float] | None]] = [[None] * len(d) for d in dets]
        todo: dict[bytes, list[tuple[int, int]]] = {}
        crops: dict[bytes, Any] = {}
        for i, (img, det) in enumerate(zip(originals, dets, strict=True)):
            for j in np.flatnonzero(det.scores < self.threshold):
                crop = self.crop(img, det.boxes[j])
                if crop is None:
                    continue
                key = self._key(crop)
                with self._lock:
                    cached = self._cache.get(key)
                    if cached is not None:
                        self._cache.move_to_end(key)
                if cached is not None:
                    self.hits += 1
                    answers[i][j] = cached
                    continue
                if key not in todo:
                    crops[key] = Image.fromarray(np.ascontiguousarray(crop[..., ::-1]))  # BGR → RGB
                todo.setdefault(key, []).append((i, int(j)))
        if todo:
            keys = list(todo)
            self.misses += len(keys)
            probs = np.asarray(self.fn([crops[k] for k in keys]), dtype=np.float64)
            if probs.ndim != 2 or probs.shape[0] != len(keys):
                raise ServeError(
                    f"the cascade teacher returned shape {probs.shape} for {len(keys)} crops; "
                    "expected (crops, classes) probabilities over ontology ids"
                )
            best = probs.argmax(1)
            for k, key in enumerate(keys):
                cid = int(best[k])
                ans = (cid if cid < len(self.ontology) else OTHER_ID, float(probs[k, cid]))
                with self._lock:
                    self._cache[key] = ans
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
                for i, j in todo[key]:
                    answers[i][j] = ans
        return answers


def load_teacher(spec: str, params: Params | None) -> Teacher:
    """``module:factory`` → ``factory(params)`` (or ``factory()``): the cascade's teacher."""
    if ":" not in spec:
        raise ServeError(
            f"serve.cascade_teacher = {spec!r}: expected `module:factory`, e.g. wanwu.models.teachers:from_params. "
            "Set it in params.yaml or turn serve.cascade off."
        )
    mod, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ServeError(f"serve.cascade_teacher = {spec!r}: cannot import it ({e}).") from e
    try:
        return factory(params)
    except TypeError:
        return factory()


# ---- what the cascade buys, on a labelled set ----------------------------------------------------------------
@dataclass
class Sample:
    """One labelled image: BGR pixels, truth boxes (n, 4) in pixels and their ontology ids (−1 = other)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def _greedy_match(pb: np.ndarray, ps: np.ndarray, tb: np.ndarray, thr: float = 0.5) -> list[tuple[int, int]]:
    """Predictions (best first) matched to the unmatched truth box they overlap most, IoU ≥ thr."""
    if not len(pb) or not len(tb):
        return []
    iou = _iou(pb, tb)
    used = np.zeros(len(tb), bool)
    pairs = []
    for i in np.argsort(-ps, kind="stable"):
        cand = np.where(used, -1.0, iou[i])
        j = int(cand.argmax())
        if cand[j] >= thr:
            used[j] = True
            pairs.append((int(i), j))
    return pairs


def map50(preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], samples: Sequence[Sample]) -> float:
    """mAP at IoU 0.5 (all-point interpolated AP per class, mean over classes with truth boxes)."""
    classes = sorted({int(c) for s in samples for c in s.labels})
    aps = []
    for c in classes:
        n_truth = sum(int((s.labels == c).sum()) for s in samples)
        scores, hits = [], []
        for (pb, ps, pl), s in zip(preds, samples, strict=True):
            m = pl == c
            tb = s.boxes[s.labels == c]
            matched = {i for i, _ in _greedy_match(pb[m], ps[m], tb)}
            scores.extend(ps[m].tolist())
            hits.extend(i in matched for i in range(int(m.sum())))
        if not scores:
            aps.append(0.0)
            continue
        order = np.argsort(-np.asarray(scores), kind="stable")
        tp = np.cumsum(np.asarray(hits, float)[order])
        recall = tp / max(n_truth, 1)
        precision = tp / np.arange(1, len(tp) + 1)
        mrec = np.concatenate([[0.0], recall, [recall[-1]]])
        mpre = np.concatenate([[1.0], precision, [0.0]])
        mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
        aps.append(float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:])))
    return float(np.mean(aps)) if aps else 0.0


def measure_cascade(
    detector: OnnxDetector,
    teacher: Teacher,
    ontology: Ontology,
    samples: Sequence[Sample],
    threshold: float = 0.5,
    context: float | None = None,
) -> dict[str, float]:
    """The cascade's accuracy gain and latency cost on labelled images (the gold set), detector alone vs cascade.

    Accuracy: labels of predicted boxes matched to truth boxes (IoU ≥ 0.5) that name the truth's class; mAP50 with
    the labels each way. Latency: ms per image, one image at a time, the cascade with a cold cache.
    """
    labels = class_labels(detector.names, ontology)
    base, casc = [], []
    t_det = t_casc = 0.0
    relabelled = 0
    cascade = Cascade(teacher, threshold, ontology, cache_size=0, context=context)
    for s in samples:
        t0 = time.perf_counter()
        det = detector.predict([s.image])[0]
        t1 = time.perf_counter()
        answers = cascade.relabel([s.image], [det])[0]
        t2 = time.perf_counter()
        t_det += t1 - t0
        t_casc += t2 - t0
        ids = np.asarray([labels.get(int(c), (OTHER_ID,))[0] for c in det.classes], np.int64)
        new = np.asarray([a[0] if a is not None else ids[j] for j, a in enumerate(answers)], np.int64)
        relabelled += sum(a is not None for a in answers)
        base.append((det.boxes, det.scores, ids))
        casc.append((det.boxes, det.scores, new))

    def accuracy(preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, int]:
        right = total = 0
        for (pb, ps, pl), s in zip(preds, samples, strict=True):
            for i, j in _greedy_match(pb, ps, s.boxes):
                total += 1
                right += int(pl[i] == s.labels[j])
        return (right / total if total else 0.0), total

    acc_d, matched = accuracy(base)
    acc_c, _ = accuracy(casc)
    n = max(len(samples), 1)
    return {
        "images": len(samples),
        "matched_boxes": matched,
        "relabelled_boxes": relabelled,
        "label_accuracy_detector": acc_d,
        "label_accuracy_cascade": acc_c,
        "map50_detector": map50(base, samples),
        "map50_cascade": map50(casc, samples),
        "ms_per_image_detector": 1000 * t_det / n,
        "ms_per_image_cascade": 1000 * t_casc / n,
    }


def gold_samples(data_dir: str | Path, limit: int | None = None) -> list[Sample]:
    """The gold test split (collect's manifest) with its human labels, as :class:`Sample` s."""
    import cv2

    from wanwu import contracts

    data_dir = Path(data_dir)
    manifest = contracts.read("manifest", data_dir / "collect" / "manifest.parquet")
    labels = contracts.read("labels", data_dir / "collect" / "human_labels.parquet")
    gold = manifest[manifest["split"] == "gold"]
    if limit:
        gold = gold.head(limit)
    by_sha = dict(tuple(labels.groupby("sha256")))
    out = []
    for row in gold.itertuples():
        img = cv2.imread(str(data_dir / row.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        lab = by_sha.get(row.sha256)
        if lab is None:
            boxes, ids = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        else:
            boxes = lab[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
            ids = lab["label_id"].to_numpy(np.int64)
        out.append(Sample(img, boxes, ids))
    return out


# ---- metrics -------------------------------------------------------------------------------------------------
class Metrics:
    """One Prometheus registry per app, so several apps (tests, bench) never share counters."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
        self.requests = Counter(
            "wanwu_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "wanwu_request_duration_seconds", "HTTP request latency by endpoint", ["endpoint"], buckets=lat, registry=r
        )
        self.errors = Counter("wanwu_errors", "refused or failed requests by reason", ["reason"], registry=r)
        self.images = Counter("wanwu_images", "images recognized", registry=r)
        self.boxes = Counter("wanwu_boxes", "boxes returned", registry=r)
        self.batch_size = Histogram(
            "wanwu_batch_size",
            "images per onnxruntime call (micro-batching at work when above 1)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.inference = Histogram(
            "wanwu_inference_seconds",
            "one batch: pad and normalise, onnxruntime, NMS, cascade",
            buckets=lat,
            registry=r,
        )
        self.queue_wait = Histogram(
            "wanwu_queue_wait_seconds", "time a job waited for its batch to start", buckets=lat, registry=r
        )
        self.queue_depth = Gauge("wanwu_queue_depth", "jobs waiting for a batch", registry=r)
        self.model_info = Gauge(
            "wanwu_model_info", "1 for the model version being served", ["version", "source"], registry=r
        )
        self.model_version = Gauge(
            "wanwu_model_version", "registry version number being served (0 for a file model)", registry=r
        )
        self.ready = Gauge("wanwu_ready", "1 when a model is loaded and requests are served", registry=r)
        self.reloads = Counter("wanwu_model_loads", "model loads by outcome", ["outcome"], registry=r)
        self.cascade_crops = Counter("wanwu_cascade_crops", "crops the teacher named (cache misses)", registry=r)
        self.cascade_hits = Counter("wanwu_cascade_cache_hits", "crops answered from the cache", registry=r)
        self.cascade_relabelled = Counter("wanwu_cascade_relabelled", "boxes the teacher re-named", registry=r)


class _HttpMetrics:
    """Pure ASGI middleware (no per-request task like BaseHTTPMiddleware): count and time every request."""

    def __init__(self, app: Any, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"  # bounded label values
        method = scope["method"] if scope["method"] in ("GET", "POST", "HEAD") else "other"
        status = [500]
        t0 = time.perf_counter()

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, method, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


# ---- the served model and the micro-batcher ------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    version: str
    detector: OnnxDetector
    labels: dict[int, Label]
    path: str
    loaded_at: str


@dataclass
class _Job:
    items: list[Prepared]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _JobResult:
    model: LoadedModel
    detections: list[Detections]
    teacher: list[list[tuple[int, float] | None]] | None


class Busy(Exception):
    pass


def _fail(jobs: Sequence[_Job], error: BaseException) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(error)


def _settle(jobs: Sequence[_Job], outcome: Sequence[_JobResult] | BaseException) -> None:
    """On the event loop: answer each job of a batch (a job whose client went away is left alone)."""
    if isinstance(outcome, BaseException):
        _fail(jobs, outcome)
        return
    for j, r in zip(jobs, outcome, strict=True):
        if not j.future.done():
            j.future.set_result(r)


class MicroBatcher:
    """Inference threads that form their own batches from one queue (see the module docstring).

    Only a free thread takes jobs, and one batch gathers at a time: while every thread is busy, requests wait in
    the queue and the next batch takes as many of them as ``max_batch`` allows, so batches grow with the load by
    themselves. The threads wait on the queue themselves instead of being handed batches by the event loop: a job
    enqueued by the decode thread that prepared it starts its batch without waiting for the loop, which under
    load is busy with HTTP (2.6-3 ms from the last job of a batch to its onnxruntime call, measured, when a
    coroutine formed the batches).
    """

    def __init__(self, server: Server, max_batch: int, window_s: float, max_queue: int, workers: int = 1) -> None:
        self.server = server
        self.max_batch, self.window, self.max_queue = max_batch, window_s, max_queue
        self.workers = max(int(workers), 1)
        self._pending: deque[_Job] = deque()
        self._ready = threading.Condition()  # guards _pending and _stopping; notified on every new job
        self._gather = threading.Lock()  # held by the one thread forming a batch
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cascade_lock = threading.Lock()  # a teacher need not be thread-safe; its counters are per batch

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"wanwu-infer-{k}", daemon=True) for k in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    async def stop(self) -> None:
        with self._ready:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._ready.notify_all()
        _fail(left, ApiError(503, "shutting_down", "the server is shutting down; retry"))
        threads, self._threads = self._threads, []
        for t in threads:  # batches in flight finish and answer (the loop runs meanwhile: their callbacks land)
            await asyncio.to_thread(t.join)

    def enqueue(self, job: _Job) -> None:
        """Queue a job from any thread (the decode thread that prepared it); Busy when the queue is full."""
        with self._ready:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the server is shutting down; retry")
            if len(self._pending) >= self.max_queue:
                raise Busy()
            self._pending.append(job)
            depth = len(self._pending)
            self._ready.notify()
        self.server.metrics.queue_depth.set(depth)

    def _next_batch(self) -> list[_Job] | None:
        """Wait for a job, then up to ``window`` for company, up to ``max_batch`` images. None: stopping."""
        with self._ready:
            while not self._pending:
                if self._stopping:
                    return None
                self._ready.wait()
            jobs = [self._pending.popleft()]
            n = len(jobs[0].items)
            deadline = time.perf_counter() + self.window
            while n < self.max_batch and not self._stopping:
                if self._pending:
                    if n + len(self._pending[0].items) > self.max_batch:
                        break  # stays first in line for the next batch
                    job = self._pending.popleft()
                    jobs.append(job)
                    n += len(job.items)
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            depth = len(self._pending)
        self.server.metrics.queue_depth.set(depth)
        return jobs

    def _work(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            with self._gather:  # one batch gathers at a time; the other threads run theirs meanwhile
                jobs = self._next_batch()
            if jobs is None:
                return
            jobs = [j for j in jobs if not j.future.done()]  # the client went away
            if not jobs:
                continue
            now = time.perf_counter()
            for j in jobs:
                self.server.metrics.queue_wait.observe(now - j.enqueued)
            model = self.server.model  # read once: this batch finishes on this model even if a swap happens now
            try:
                if model is None:
                    raise ApiError(503, "not_ready", "no model is loaded yet; retry when GET /health says ready")
                outcome: list[_JobResult] | BaseException = self._infer(model, jobs)
            except Exception as e:  # every job of the batch learns why
                outcome = e
            try:
                loop.call_soon_threadsafe(_settle, jobs, outcome)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                return

    def _infer(self, model: LoadedModel, jobs: list[_Job]) -> list[_JobResult]:
        m = self.server.metrics
        t0 = time.perf_counter()
        items = [p for j in jobs for p in j.items]
        dets: list[Detections] = []
        for s in range(0, len(items), self.max_batch):
            chunk = items[s : s + self.max_batch]
            dets.extend(model.detector.run(chunk))
            m.batch_size.observe(len(chunk))
        teacher = None
        cascade = self.server.cascade
        if cascade is not None:
            with self._cascade_lock:
                hits, misses = cascade.hits, cascade.misses
                try:
                    teacher = cascade.relabel([p.original for p in items], dets)
                except Exception:  # the cascade is an extra: a failing teacher degrades to the detector's labels
                    log.exception("cascade teacher failed; answering with the detector's labels")
                    m.errors.labels("cascade_failed").inc()
                    teacher = None
                m.cascade_hits.inc(cascade.hits - hits)
                m.cascade_crops.inc(cascade.misses - misses)
            if teacher is not None:
                m.cascade_relabelled.inc(sum(a is not None for row in teacher for a in row))
        m.inference.observe(time.perf_counter() - t0)
        out, k = [], 0
        for j in jobs:
            n = len(j.items)
            out.append(_JobResult(model, dets[k : k + n], teacher[k : k + n] if teacher is not None else None))
            k += n
        return out


def _freeze_heap() -> None:
    import gc

    gc.collect()
    gc.freeze()


def inference_threads(threads: int) -> tuple[int, int]:
    """``serve.threads`` → (onnxruntime intra-op threads per call, batches run at once).

    0 (one per core): one single-threaded call per core, several batches at once. A detector of this size splits
    poorly across intra-op threads: each of its few hundred small operators ends in a barrier where the threads
    wait for one another (or spin, burning the cores the decode and HTTP threads need). On the 2-core bench
    machine (YOLO11n, 256×320): one two-thread call 67–80 images/s, one one-thread call 86–91, two one-thread
    calls side by side 100–102 with other work on the machine. An explicit ``threads`` is honoured per call, with
    as many calls at once as the cores allow.
    """
    cores = usable_cores()
    if threads <= 0:
        return 1, cores
    return threads, max(cores // threads, 1)


class Server:
    """Everything one app holds: the model reference, the batcher, the watcher, the cascade, the metrics."""

    def __init__(
        self,
        params: ServeParams,
        source: ModelSource,
        ontology: Ontology | None = None,
        teacher: Teacher | None = None,
        token: str | None = None,
    ) -> None:
        self.params = params
        self.source = source
        self.ontology = ontology
        self.token = token or None
        self.metrics = Metrics()
        self.model: LoadedModel | None = None
        self.last_error: str | None = None
        self._failed_version: str | None = None
        self.cascade: Cascade | None = None
        if params.cascade:
            if teacher is None:
                raise ServeError("serve.cascade is on but no teacher was given: set serve.cascade_teacher.")
            if ontology is None:
                raise ServeError("serve.cascade needs the ontology (teacher columns are ontology ids).")
            self.cascade = Cascade(
                teacher, params.cascade_threshold, ontology, params.cascade_cache, params.cascade_context
            )
        self.intra_threads, workers = inference_threads(params.threads)
        # decoding is CPU work that releases the GIL: a few threads of our own, not anyio's pool of 40 (and its
        # per-call cancel scope and capacity limiter)
        self.decode_pool = ThreadPoolExecutor(max_workers=max(4, workers), thread_name_prefix="wanwu-decode")
        self.batcher = MicroBatcher(
            self, params.max_batch, params.batch_window_ms / 1000, params.max_queue, workers=workers
        )
        self._watcher: asyncio.Task | None = None

    # -- lifecycle --
    async def start(self) -> None:
        self.batcher.start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="wanwu-watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    async def _watch(self) -> None:
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store is down, say: keep serving the old model, say so in /health
                self.last_error = f"{self.source.description}: {type(e).__name__}: {e}"
                log.warning("model check failed: %s", self.last_error)
            await asyncio.sleep(self.params.reload_interval)

    async def check_once(self) -> bool:
        """Poll the source; load and swap in a new version. True when a swap happened."""
        version = await asyncio.to_thread(self.source.poll)
        if version is None:
            if self.model is None:
                self.last_error = f"{self.source.description}: nothing to serve yet (no such model or alias)"
            return False
        if (self.model is not None and version == self.model.version) or version == self._failed_version:
            return False
        try:
            t0 = time.perf_counter()
            path = await asyncio.to_thread(self.source.fetch, version)
        except Exception as e:  # the store or the network: transient, so the same version is tried again
            self.last_error = f"version {version} of {self.source.description} could not be fetched: {e}"
            self.metrics.reloads.labels("fetch_error").inc()
            log.warning("%s; will retry", self.last_error)
            return False
        try:
            t1 = time.perf_counter()
            new = await asyncio.to_thread(self._load, version, path)
        except Exception as e:  # the model itself is bad: not retried until the source moves on
            self._failed_version = version
            self.last_error = f"version {version} of {self.source.description} failed to load: {e}"
            self.metrics.reloads.labels("error").inc()
            log.error("%s; still serving %s", self.last_error, self.model.version if self.model else "nothing")
            return False
        if self.model is None:
            # Before the first answer: collect, then move everything alive (the server's libraries, hundreds of
            # thousands of objects) out of the collector's sight. Otherwise a full collection, which allocations
            # trigger every so often (the registry polls, a hot swap), walks all of them while holding the GIL:
            # measured 280-320 ms with every request stopped, the p99 of a run with a swap.
            await asyncio.to_thread(_freeze_heap)
        old, self.model = self.model, new  # the swap: one reference; batches in flight keep theirs
        self.last_error = None
        m = self.metrics
        m.reloads.labels("ok").inc()
        if old is not None:
            m.model_info.remove(old.version, self.source.description)
        m.model_info.labels(new.version, self.source.description).set(1)
        m.model_version.set(float(new.version) if new.version.isdigit() else 0)
        m.ready.set(1)
        log.info(
            "serving %s version %s (was %s; fetched in %.2f s, loaded and warmed up in %.2f s)",
            self.source.description,
            new.version,
            old.version if old else None,
            t1 - t0,
            time.perf_counter() - t1,
        )
        return True

    def _load(self, version: str, path: Path) -> LoadedModel:
        p = self.params
        det = OnnxDetector(
            path, conf=p.conf, iou=p.iou, max_det=p.max_det, imgsz=p.imgsz, threads=self.intra_threads, spin=False
        )
        det.warmup()
        labels = class_labels(det.names, self.ontology)
        return LoadedModel(version, det, labels, str(path), datetime.now(UTC).isoformat(timespec="seconds"))

    # -- request path --
    def check_token(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API token: send `Authorization: Bearer <token>` "
                f"(the token is the server's ${self.params.token_env}).",
                field="Authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def decode(
        self, data: bytes, field_name: str, label: str | None = None, fit: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Bytes → (BGR uint8 array, the picture's height and width), refusing what does not decode or has too many
        pixels (before decoding it). ``fit``: the model's input size; a JPEG at least twice as large is decoded at
        1/2, 1/4 or 1/8 of its size (see :func:`wanwu.onnx_model.reduced_jpeg_factor`)."""
        import cv2
        from PIL import Image, UnidentifiedImageError

        p = self.params
        label = label or field_name
        open_image = pil_open()
        try:
            with open_image(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
        except Image.DecompressionBombError as e:
            raise ApiError(413, "too_many_pixels", f"{label}: {e}", field=field_name, limit=p.max_pixels) from None
        except UnidentifiedImageError:
            raise ApiError(
                422,
                "undecodable",
                f"{label} does not decode as an image (unknown format or corrupt header); send JPEG, PNG, WebP or BMP.",
                field=field_name,
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ApiError(
                422,
                "undecodable",
                f"{label} does not decode as an image ({type(e).__name__}: {e}); send JPEG, PNG, WebP or BMP.",
                field=field_name,
            ) from None
        if w * h > p.max_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"{label} is {w}×{h} = {w * h} pixels, above the limit of {p.max_pixels}; downscale it.",
                field=field_name,
                limit=p.max_pixels,
                observed=w * h,
            )
        factor = reduced_jpeg_factor((h, w), fit) if fit is not None and data[:3] == b"\xff\xd8\xff" else 1
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}.get(
            factor, cv2.IMREAD_REDUCED_COLOR_8
        )
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)  # applies EXIF orientation (reduced too)
        if arr is not None and factor > 1:
            # the stored size, or its transpose when EXIF turned the picture a quarter
            hr, wr = arr.shape[:2]
            turned = abs(hr - h / factor) + abs(wr - w / factor) > abs(hr - w / factor) + abs(wr - h / factor)
            return arr, ((w, h) if turned else (h, w))
        if arr is None:  # a format OpenCV lacks (GIF, …): let Pillow try
            try:
                with open_image(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("RGB"))[..., ::-1].copy()
            except Exception as e:
                raise ApiError(
                    422,
                    "undecodable",
                    f"{label} is truncated or corrupt ({type(e).__name__}: {e}).",
                    field=field_name,
                ) from None
        return arr, arr.shape[:2]

    def prepare(self, blobs: list[tuple[str, str, bytes]]) -> list[Prepared]:
        """(field, label, bytes) → images decoded and resized for the current model (in a worker thread).

        Large JPEGs decode reduced unless ``serve.reduced_decode`` is off or the cascade needs full-size crops."""
        model = self.model
        if model is None:
            raise ApiError(503, "not_ready", "no model is loaded yet; retry when GET /health says ready")
        det = model.detector
        fit = det.imgsz if self.params.reduced_decode and self.cascade is None else None
        out = []
        for name, label, data in blobs:
            arr, hw = self.decode(data, name, label, fit)
            out.append(det.prepare(arr, hw))
        return out

    def prepare_and_enqueue(self, blobs: list[tuple[str, str, bytes]], answer: asyncio.Future) -> list[Prepared]:
        """Decode and prepare (in a decode thread), then queue the job whose result ``answer`` will hold."""
        prepared = self.prepare(blobs)
        self.batcher.enqueue(_Job(prepared, answer))
        return prepared

    def to_response(
        self, result: _JobResult, filenames: list[str | None], sizes: list[tuple[int, int]], elapsed_ms: float
    ) -> dict[str, Any]:
        labels = result.model.labels
        images = []
        nboxes = 0
        for k, det in enumerate(result.detections):
            teacher = result.teacher[k] if result.teacher is not None else None
            boxes = []
            # .tolist() once per image: Python floats and ints, not one numpy scalar per coordinate
            for j, ((x1, y1, x2, y2), score, cls) in enumerate(
                zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(), strict=True)
            ):
                oid, zh, en = labels.get(cls, (OTHER_ID, OTHER_ZH, OTHER_EN))
                box = {
                    "x1": round(x1, 1),
                    "y1": round(y1, 1),
                    "x2": round(x2, 1),
                    "y2": round(y2, 1),
                    "confidence": round(score, 4),
                    "class_id": oid,
                    "label_zh": zh,
                    "label_en": en,
                    "source": "detector",
                    "teacher_confidence": None,
                }
                t = teacher[j] if teacher is not None else None
                if t is not None:
                    tid, tp = t
                    assert self.ontology is not None
                    box.update(
                        class_id=tid,
                        label_zh=self.ontology.zh(tid),
                        label_en=self.ontology.en(tid),
                        source="teacher",
                        teacher_confidence=round(tp, 4),
                    )
                boxes.append(box)
            nboxes += len(boxes)
            h, w = sizes[k]
            images.append({"filename": filenames[k], "width": w, "height": h, "boxes": boxes})
        self.metrics.images.inc(len(images))
        self.metrics.boxes.inc(nboxes)
        return {"model_version": result.model.version, "images": images, "elapsed_ms": round(elapsed_ms, 2)}


# ---- the app -------------------------------------------------------------------------------------------------
def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            "too_large",
            f"the request body is {declared} bytes, above the limit of {limit}; send fewer or smaller images.",
            field="body",
            limit=limit,
            observed=int(declared),
        )
    chunks, total = [], 0
    async for chunk in request.stream():  # counts as it reads: chunked uploads cannot slip past the limit
        total += len(chunk)
        if total > limit:
            raise ApiError(
                413,
                "too_large",
                f"the request body exceeds the limit of {limit} bytes; send fewer or smaller images.",
                field="body",
                limit=limit,
                observed=total,
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_multipart(request: Request, body: bytes, max_files: int) -> Any:
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once():
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=max_files, max_fields=100)
    try:
        return await parser.parse()
    except MultiPartException as e:
        if "files" in e.message.lower():
            raise ApiError(  # a schema violation (maxItems), so 422 like the others, not a size problem
                422,
                "too_many_images",
                f"{e.message} Send at most {max_files} images per request.",
                field="images",
                limit=max_files,
            ) from None
        raise ApiError(400, "bad_multipart", f"the multipart body is malformed: {e.message}", field="body") from None


def create_app(
    params: ServeParams,
    source: ModelSource,
    ontology: Ontology | None = None,
    teacher: Teacher | None = None,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app. ``token``: required bearer token (None: open). Nothing starts until the app's lifespan."""
    server = Server(params, source, ontology, teacher, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="wanwu 万物",
        version="1",
        summary="Object recognition with Chinese and English labels",
        description=(
            "POST images to /recognize (multipart field `images`, one or several). Limits: "
            f"{params.max_images} images, {params.max_image_bytes} bytes each, {params.max_request_bytes} bytes "
            f"per request, {params.max_pixels} pixels per image."
        ),
        lifespan=lifespan,
    )
    app.state.server = server
    m = server.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        m.errors.labels(exc.code).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        m.errors.labels("internal").inc()
        log.exception("request failed")
        body = {"detail": f"internal error: {type(exc).__name__}: {exc}", "code": "internal"}
        return JSONResponse(body, status_code=500)

    bearer = HTTPBearer(auto_error=False, description=f"the server's ${params.token_env}")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        server.check_token(credentials)

    errors = {
        400: {"model": ErrorBody, "description": "malformed multipart body"},
        413: {"model": ErrorBody, "description": "too large: request body, bytes of an image, or its pixel count"},
        415: {
            "model": ErrorBody,
            "description": "not multipart/form-data, or a part that is not an accepted image type",
        },
        422: {"model": ErrorBody, "description": "no `images` field, too many images, or one that does not decode"},
        503: {"model": ErrorBody, "description": "no model loaded yet, or the queue is full; retry"},
    }
    if server.token:
        errors[401] = {"model": ErrorBody, "description": "missing or wrong bearer token"}
    allowed = [t.lower() for t in params.content_types]
    image_types = ", ".join(t for t in allowed if t.startswith("image/")) or "image/jpeg"
    request_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": params.max_images,
                            "description": "one or more image files (JPEG, PNG, WebP, BMP)",
                        }
                    },
                },
                "encoding": {"images": {"contentType": image_types}},
            }
        },
    }

    @app.post(
        "/recognize",
        response_model=RecognizeOut,
        responses=errors,
        dependencies=[Depends(require_token)] if server.token else [],
        openapi_extra={"requestBody": request_body},
        summary="Detect and name the objects in one or more images",
    )
    async def recognize(request: Request) -> Response:
        t0 = time.perf_counter()
        p = params
        if server.model is None:
            raise ApiError(503, "not_ready", "no model is loaded yet; retry when GET /health says ready")
        ctype = _media_type(request.headers.get("content-type"))
        if ctype != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                "send the images as multipart/form-data in the field `images` "
                f"(e.g. curl -F images=@photo.jpg), not {ctype or 'a body without Content-Type'}.",
                field="Content-Type",
                limit="multipart/form-data",
                observed=ctype or None,
            )
        body = await _read_body(request, p.max_request_bytes)
        form = await _parse_multipart(request, body, p.max_images)
        try:
            parts = form.getlist("images")
            if not parts:
                got = sorted(set(form.keys()))
                raise ApiError(
                    422,
                    "missing_images",
                    "no file in the multipart field `images`"
                    + (f" (fields received: {', '.join(got)})" if got else "")
                    + "; send one or more images as `images`.",
                    field="images",
                )
            blobs: list[tuple[str, str, bytes]] = []
            filenames: list[str | None] = []
            for i, part in enumerate(parts):
                name = f"images[{i}]"
                if isinstance(part, str):
                    raise ApiError(422, "not_a_file", f"{name} is a text field; send a file.", field=name)
                label = f"{name} ({part.filename})" if part.filename else name
                media = _media_type(part.content_type) or "application/octet-stream"
                if media not in allowed:
                    raise ApiError(
                        415,
                        "unsupported_media_type",
                        f"{label} has type {media}; accepted: {', '.join(allowed)}.",
                        field=name,
                        limit=allowed,
                        observed=media,
                    )
                size = part.size if part.size is not None else 0
                if size > p.max_image_bytes:
                    raise ApiError(
                        413,
                        "too_large",
                        f"{label} is {size} bytes, above the limit of {p.max_image_bytes} per image.",
                        field=name,
                        limit=p.max_image_bytes,
                        observed=size,
                    )
                blobs.append((name, label, await part.read()))
                filenames.append(part.filename)
        finally:
            await form.close()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        try:
            # the decode thread queues the job itself: its batch can start before this coroutine runs again
            prepared = await loop.run_in_executor(server.decode_pool, server.prepare_and_enqueue, blobs, answer)
            result = await answer
        except asyncio.CancelledError:  # the client went away: a queued job is skipped, not run
            answer.cancel()
            raise
        except Busy:
            raise ApiError(
                503,
                "busy",
                f"the server is at its queue limit ({p.max_queue} requests waiting); retry shortly.",
                limit=p.max_queue,
                headers={"Retry-After": "1"},
            ) from None
        sizes = [prep.orig_hw for prep in prepared]
        return JSONResponse(server.to_response(result, filenames, sizes, (time.perf_counter() - t0) * 1000))

    @app.get(
        "/health",
        response_model=HealthOut,
        responses={503: {"model": HealthOut, "description": "no model loaded yet"}},
        summary="Readiness and the model version being served",
    )
    async def health() -> JSONResponse:
        model = server.model
        body = {
            "status": "ready" if model else "loading",
            "ready": model is not None,
            "model_version": model.version if model else None,
            "model_source": server.source.description,
            "model_path": model.path if model else None,
            "loaded_at": model.loaded_at if model else None,
            "classes": len(model.labels) if model else None,
            "imgsz": list(model.detector.imgsz) if model else None,
            "cascade": server.cascade is not None,
            "last_error": server.last_error,
        }
        return JSONResponse(body, status_code=200 if model else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_HttpMetrics, metrics=m, endpoints={"/recognize", "/health", "/metrics", "/openapi.json"})
    return app


# ---- entry point (wanwu serve) -------------------------------------------------------------------------------
def build(params: Params, root: str | Path, model: str | Path | None = None, token: str | None = None) -> Any:
    """The app for a project: the model file if given (``--model`` or ``serve.model``), else the registry alias."""
    from wanwu.offline import harden, state_dir

    root = harden(root)
    sp = params.serve
    model = model or sp.model or None
    if model is not None:
        path = Path(model)
        if not path.is_absolute():
            path = (Path.cwd() / path) if path.exists() else (root / path)
        if path.suffix != ".onnx":
            raise ServeError(f"--model {path}: expected an .onnx file (export the model with `wanwu stage export`).")
        source: ModelSource = FileSource(path)
    else:
        from wanwu.tracking import setup

        uri = setup(root)
        source = RegistrySource(sp.registry_model, sp.alias, state_dir(root) / "serve" / "models", uri)
    ontology = Ontology.load(params.project.ontology)
    teacher = load_teacher(sp.cascade_teacher, params) if sp.cascade else None
    if token is None:
        token = os.environ.get(sp.token_env) or None
    return create_app(sp, source, ontology, teacher, token)


def run(
    params: Params,
    root: str | Path,
    model: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (uvicorn, one process: the batcher needs every request in one event loop)."""
    import uvicorn

    app = build(params, root, model)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s %(message)s")
    uvicorn.run(
        app,
        host=host or params.serve.host,
        port=params.serve.port if port is None else port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
