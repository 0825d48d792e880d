"""collect stage: every source in params → checked images stored once by content hash, and why the rest were not.

Reads ``collect.sources`` (folders, globs, archives, URL lists, ``sample://``, YOLO / VOC / COCO / class-folder
datasets). Writes under the data folder:

* ``raw/<sha[:2]>/<sha256>.jpg``: each distinct picture once, RGB JPEG, EXIF-oriented;
* ``collect/manifest.parquet`` and ``collect/rejects.parquet`` (contracts ``manifest`` / ``rejects``);
* ``collect/human_labels.parquet`` (imported boxes, contract ``labels``, origin ``human``),
  ``collect/truth.parquet`` (the sample world's truth), ``collect/image_labels.parquet`` (class folders);
* ``collect/near_duplicates.parquet`` (sha256, near_sha256, distance): kept, reported, never dropped;
* ``collect/seen.parquet``: (source, key) → outcome, so a re-run skips unchanged inputs without reading them;
* ``world/catalogue`` and ``world/generic`` when a ``sample://`` source is collected.

Images are written before the tables; tables are written atomically at the end and every
:data:`CHECKPOINT_EVERY` images, so a killed run resumes without duplicates or losses (an image already in
``raw/`` is re-indexed, not written twice).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from tasks import lazy_task
from wanwu import contracts, images
from wanwu.config import CollectParams, Params, ProjectParams, SourceSpec
from wanwu.images import BAD_BOX, DUPLICATE, ImageReject, Normalized
from wanwu.ontology import Ontology
from wanwu.sources import (
    SPLIT_RANK,
    Item,
    RawBox,
    Rejected,
    SourceError,
    check_source,
    fetch,
    iter_source,
)

CHECKPOINT_EVERY = 500
MIN_BOX_SIDE = 1.0  # pixels: a box thinner than this after clipping has no area a detector can learn from


class CollectResult(BaseModel):
    """What one collect run did: where the outputs are and how many of each thing."""

    data_dir: Path
    manifest: Path
    rejects: Path
    human_labels: Path
    truth: Path
    image_labels: Path
    near_duplicates_table: Path
    world: Path | None = None  # world/{catalogue,generic} when a sample:// source was collected
    images_added: int = 0
    images_total: int = 0
    images_skipped: int = 0  # seen by an earlier run, unchanged: not even read
    images_reindexed: int = 0  # already in raw/ (an interrupted run), indexed without writing again
    rejects_by_reason: dict[str, int] = {}
    boxes_read: int = 0  # boxes the label files hold (human boxes)
    boxes_imported: int = 0
    boxes_on_duplicates: int = 0  # boxes of an exact-duplicate image whose kept copy has its own labels
    boxes_rejected: int = 0  # bad_box, bad_annotation, crowd, missing_file, or on a rejected image
    truth_boxes: int = 0
    image_labels_added: int = 0
    near_duplicates: int = 0
    conversions: dict[str, int] = {}  # cmyk→rgb, 16-bit→8-bit, … (kept, noted)
    files_ignored: int = 0
    per_source: list[dict[str, Any]] = []
    seconds: float = 0.0


# ---- one picture, in a worker thread ------------------------------------------------------------------
@dataclass
class _Outcome:
    item: Item | Rejected
    reject: Rejected | None = None
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    nbytes: int = 0
    phash: str = ""
    path: str = ""
    written: bool = False
    notes: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float, str, int]] = field(default_factory=list)
    truth: list[tuple[float, float, float, float, str, int]] = field(default_factory=list)
    bad_boxes: list[Rejected] = field(default_factory=list)


def place_boxes(boxes: list[RawBox], norm: Normalized) -> tuple[list[tuple], list[Rejected]]:
    """Dataset boxes → pixels of the stored (oriented) image, clipped; boxes with no area become bad_box rejects."""
    w, h = norm.width, norm.height
    placed: list[tuple] = []
    bad: list[Rejected] = []
    for b in boxes:
        x1, y1, x2, y2 = b.x1, b.y1, b.x2, b.y2
        if b.normalized:
            x1, y1, x2, y2 = x1 * w, y1 * h, x2 * w, y2 * h
        elif b.declared_size and norm.orientation != 1 and tuple(b.declared_size) == tuple(norm.raw_size) != (w, h):
            # written on the file's raw pixels, and the EXIF rotation swaps the sides: rotate the box too
            x1, y1, x2, y2 = images.orient_box((x1, y1, x2, y2), norm.orientation, *norm.raw_size)
        cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
        cx2, cy2 = min(max(x2, 0.0), w), min(max(y2, 0.0), h)
        if cx2 - cx1 < MIN_BOX_SIDE or cy2 - cy1 < MIN_BOX_SIDE:
            bad.append(
                Rejected(
                    b.ref or b.name,
                    BAD_BOX,
                    f"{b.name!r} box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) has no area inside the {w}×{h} image",
                    boxes=1,
                )
            )
            continue
        placed.append((cx1, cy1, cx2, cy2, b.name, b.label_id))
    return placed, bad


class _Worker:
    def __init__(self, params: CollectParams, data_dir: Path, known: set[str]):
        self.p = params
        self.data_dir = data_dir
        self.known = known  # shas already stored (read-only here; the main thread adds to it)

    def __call__(self, thing: Item | Rejected) -> _Outcome:
        if isinstance(thing, Rejected):
            return _Outcome(thing, reject=thing)
        item = thing
        p = self.p
        try:
            if item.render is not None:
                image, truth = item.render()
                norm = images.from_image(image, min_side=p.min_side, max_pixels=p.max_pixels)
                if item.boxes is not None:  # a labeled scene: its ontology objects are the human boxes
                    item.boxes = [b for b in truth if b.label_id >= 0]
            else:
                if item.size is not None and item.size > p.max_bytes:
                    raise ImageReject(images.TOO_LARGE, f"{item.size} bytes > max_bytes {p.max_bytes}; not read")
                data = item.data
                if data is None:
                    if item.read is not None:
                        data = item.read()
                    else:  # a URL
                        data = fetch(item.source, timeout=p.url_timeout, retries=p.url_retries, max_bytes=p.max_bytes)
                norm = images.decode(data, max_pixels=p.max_pixels, min_side=p.min_side, max_bytes=p.max_bytes)
                truth = []
        except ImageReject as e:
            lost = len(item.boxes or []) + sum(r.boxes for r in item.box_rejects)
            return _Outcome(item, reject=Rejected(item.source, e.reason, e.detail, key=item.key, boxes=lost))
        out = _Outcome(
            item,
            sha256=norm.sha256,
            width=norm.width,
            height=norm.height,
            format=norm.format,
            nbytes=norm.bytes,
            notes=norm.notes,
        )
        if norm.sha256 not in self.known:
            out.path, out.written = images.store(norm.image, self.data_dir, norm.sha256, p.jpeg_quality)
            out.phash = images.phash_hex(norm.image)
            if item.render is not None:
                out.nbytes = (self.data_dir / out.path).stat().st_size  # rendered: no original file, so the stored one
        else:
            out.path = images.raw_relpath(norm.sha256)
        if item.boxes:
            out.boxes, out.bad_boxes = place_boxes(item.boxes, norm)
        if truth:
            out.truth, _ = place_boxes(truth, norm)
        out.bad_boxes = list(item.box_rejects) + out.bad_boxes
        return out


def _ordered(pool: ThreadPoolExecutor, fn: Any, things: Iterable[Any], window: int) -> Iterator[Any]:
    """pool.map that keeps the input order and at most ``window`` items in flight (bounded memory)."""
    q: deque[Future] = deque()
    for x in things:
        q.append(pool.submit(fn, x))
        while len(q) >= window:
            yield q.popleft().result()
    while q:
        yield q.popleft().result()


# ---- the tables, old and new ---------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(UTC)


def _read_or_empty(name: str, path: Path) -> pd.DataFrame:
    return contracts.read(name, path) if path.is_file() else contracts.empty(name)


class _Tables:
    """Existing tables plus this run's rows; written together, atomically each, at checkpoints and the end."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir / "collect"
        d = self.dir
        self.paths = {
            "manifest": d / "manifest.parquet",
            "rejects": d / "rejects.parquet",
            "human_labels": d / "human_labels.parquet",
            "truth": d / "truth.parquet",
            "image_labels": d / "image_labels.parquet",
            "near_duplicates": d / "near_duplicates.parquet",
            "seen": d / "seen.parquet",
        }
        self.manifest = _read_or_empty("manifest", self.paths["manifest"])
        self.rejects = _read_or_empty("rejects", self.paths["rejects"])
        self.human = _read_or_empty("labels", self.paths["human_labels"])
        self.truth = _read_or_empty("labels", self.paths["truth"])
        self.image_labels = _read_or_empty("image_labels", self.paths["image_labels"])
        self.near = (
            pd.read_parquet(self.paths["near_duplicates"])
            if self.paths["near_duplicates"].is_file()
            else pd.DataFrame(
                {
                    "sha256": pd.Series(dtype=str),
                    "near_sha256": pd.Series(dtype=str),
                    "distance": pd.Series(dtype="int32"),
                }
            )
        )
        # The skip index is trusted only as far as the manifest backs it: an entry whose image is not in the
        # manifest (tables deleted or restored by hand) is forgotten, so that source is read again.
        seen: dict[str, list] = {}
        if self.paths["manifest"].is_file() and self.paths["seen"].is_file():
            seen = pq.read_table(self.paths["seen"]).to_pydict()
        stored = set(self.manifest["sha256"])
        self.seen: dict[str, str] = {}
        self.seen_sha: dict[str, str] = {}
        for source, key, sha in zip(seen.get("source", []), seen.get("key", []), seen.get("sha256", []), strict=True):
            if not sha or sha in stored:
                self.seen[source], self.seen_sha[source] = key, sha or ""
        self.new: dict[str, list[dict]] = {
            k: [] for k in ("manifest", "rejects", "human", "truth", "image_labels", "near")
        }
        self.split_upgrades: dict[str, str] = {}
        self.dirty = False
        # indexes
        self.kept_source: dict[str, str] = dict(zip(self.manifest["sha256"], self.manifest["source"], strict=True))
        self.split: dict[str, str] = dict(zip(self.manifest["sha256"], self.manifest["split"], strict=True))
        self.human_shas = set(self.human["sha256"]) | {s for s, sp in self.split.items() if sp in ("seed", "gold")}
        self.truth_shas = set(self.truth["sha256"])
        self.image_label_shas = set(self.image_labels["sha256"])
        self.next_box: Counter = Counter()
        for df, origin in ((self.human, "human"), (self.truth, "truth")):
            if len(df):
                for sha, n in df.groupby("sha256")["box_id"].max().items():
                    self.next_box[(sha, origin)] = int(n) + 1

    def write(self) -> None:
        if not self.dirty:
            return
        n = self.new
        manifest = _concat(self.manifest, n["manifest"])
        if self.split_upgrades:
            manifest["split"] = [
                self.split_upgrades.get(s, sp) for s, sp in zip(manifest["sha256"], manifest["split"], strict=True)
            ]
        # A source rejected again (a retried download) or stored now replaces its older reject rows.
        replaced = {r["source"] for r in n["rejects"]} | {r["source"] for r in n["manifest"]}
        old_rejects = self.rejects[~self.rejects["source"].isin(replaced)] if replaced else self.rejects
        # Order matters for resume: labels, then the manifest, then the seen index (see _attach).
        contracts.write("rejects", _concat(old_rejects, n["rejects"]), self.paths["rejects"])
        contracts.write_atomic(_concat(self.near, n["near"]), self.paths["near_duplicates"])
        contracts.write("labels", _concat(self.human, n["human"]), self.paths["human_labels"])
        contracts.write("labels", _concat(self.truth, n["truth"]), self.paths["truth"])
        contracts.write("image_labels", _concat(self.image_labels, n["image_labels"]), self.paths["image_labels"])
        contracts.write("manifest", manifest, self.paths["manifest"])
        seen = pa.table(
            {
                "source": list(self.seen),
                "key": list(self.seen.values()),
                "sha256": [self.seen_sha.get(k, "") for k in self.seen],
            }
        )
        contracts.write_atomic(seen, self.paths["seen"])
        self.dirty = False


def _concat(old: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return old.reset_index(drop=True)
    new = pd.DataFrame(rows, columns=old.columns)
    if not len(old):
        return new
    return pd.concat([old, new], ignore_index=True)


def _label_row(sha: str, box_id: int, box: tuple, origin: str) -> dict:
    x1, y1, x2, y2, name, label_id = box
    who = "truth" if origin == "truth" else "human"
    return {
        "sha256": sha,
        "box_id": box_id,
        "x1": x1,
        "y1": y1,
        "x2": x2,
        "y2": y2,
        "proposer": who,
        "proposer_conf": 1.0,
        "topk_ids": [int(label_id)],
        "topk_probs": [1.0],
        "label_id": int(label_id),
        "confidence": 1.0,
        "origin": origin,
        "needs_review": False,
        "source_label": name,
    }


# ---- near duplicates ----------------------------------------------------------------------------------
class _NearIndex:
    """Perceptual hashes of every stored image; each new one is compared with all before it."""

    def __init__(self, shas: list[str], hashes: list[str]):
        self.shas = list(shas)
        self.arr = np.zeros(max(1024, 2 * len(hashes)), dtype=np.uint64)
        self.n = 0
        for h in hashes:
            self._push(h)

    def _push(self, h: str) -> None:
        if self.n == len(self.arr):
            self.arr = np.concatenate([self.arr, np.zeros_like(self.arr)])
        self.arr[self.n] = np.uint64(int(h or "0", 16))
        self.n += 1

    def add(self, sha: str, h: str, limit: int) -> tuple[str, int] | None:
        best = None
        if self.n:
            d = np.bitwise_count(self.arr[: self.n] ^ np.uint64(int(h, 16)))
            i = int(np.argmin(d))
            if int(d[i]) <= limit:
                best = (self.shas[i], int(d[i]))
        self.shas.append(sha)
        self._push(h)
        return best


# ---- the stage ----------------------------------------------------------------------------------------
def run(params: CollectParams, project: ProjectParams, ontology: Ontology | None = None) -> CollectResult:
    """Collect every source in ``params`` into ``project.data_dir``; a re-run adds only what is new."""
    t0 = time.perf_counter()
    data_dir = Path(project.data_dir)
    ontology = ontology or Ontology.load(project.ontology)
    for index, spec in enumerate(params.sources):
        try:
            check_source(spec, ontology)
        except SourceError as e:
            raise SourceError(_where(index, spec) + str(e)) from None
    tables = _Tables(data_dir)
    known: set[str] = set(tables.kept_source)
    near = _NearIndex(list(tables.manifest["sha256"]), list(tables.manifest["phash"].fillna("0")))
    result = CollectResult(
        data_dir=data_dir,
        manifest=tables.paths["manifest"],
        rejects=tables.paths["rejects"],
        human_labels=tables.paths["human_labels"],
        truth=tables.paths["truth"],
        image_labels=tables.paths["image_labels"],
        near_duplicates_table=tables.paths["near_duplicates"],
    )
    reasons: Counter = Counter()
    conversions: Counter = Counter()
    worker = _Worker(params, data_dir, known)
    since_checkpoint = 0

    from tqdm import tqdm

    bar = tqdm(desc="collect", unit="img", leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        with ThreadPoolExecutor(max_workers=params.workers, thread_name_prefix="collect") as pool:
            for index, spec in enumerate(params.sources):
                stats: Counter = Counter()
                src = _SourceCounts(spec)
                things = _unseen(_things(spec, ontology, stats, params, index), tables, stats)
                for out in _ordered(pool, worker, things, window=4 * params.workers):
                    _handle(out, tables, known, near, params, result, reasons, conversions, src)
                    bar.update(1)
                    since_checkpoint += 1
                    if since_checkpoint >= CHECKPOINT_EVERY:
                        tables.write()
                        since_checkpoint = 0
                result.images_skipped += stats["skipped"]
                result.files_ignored += stats["files_ignored"]
                result.boxes_read += stats["boxes_read"] + src.rendered_boxes
                result.per_source.append(src.summary(stats))
    finally:
        bar.close()
        tables.write()  # also on an interruption: what is done stays done
    sample = next((s for s in params.sources if s.uri.startswith("sample://") or s.format == "sample"), None)
    if sample is not None:
        result.world = write_world(sample.uri, ontology, data_dir / "world")
    result.rejects_by_reason = dict(sorted(reasons.items()))
    result.conversions = dict(sorted(conversions.items()))
    result.images_total = len(tables.kept_source)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


@dataclass
class _SourceCounts:
    spec: SourceSpec
    added: int = 0
    duplicates: int = 0
    rejected: int = 0
    boxes_imported: int = 0
    image_labels: int = 0
    rendered_boxes: int = 0  # human boxes of labeled sample scenes (known only once rendered)

    def summary(self, stats: Counter) -> dict[str, Any]:
        fmt = next((k.split(":", 1)[1] for k in stats if k.startswith("format:")), self.spec.format)
        return {
            "uri": self.spec.uri,
            "format": fmt,
            "added": self.added,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "skipped": stats["skipped"],
            "boxes_read": stats["boxes_read"] + self.rendered_boxes,
            "boxes_imported": self.boxes_imported,
            "image_labels": self.image_labels,
            "files_ignored": stats["files_ignored"],
        }


def _where(index: int, spec: SourceSpec) -> str:
    return f"collect.sources[{index}] ({spec.uri}): "


def _things(spec: SourceSpec, ontology: Ontology, stats: Counter, params: CollectParams, index: int) -> Iterator[Any]:
    try:
        yield from iter_source(spec, ontology, stats, max_bytes=params.max_bytes)
    except SourceError as e:
        raise SourceError(_where(index, spec) + str(e)) from None


def _unseen(things: Iterable[Item | Rejected], tables: _Tables, stats: Counter) -> Iterator[Item | Rejected]:
    """Drop what an earlier run already handled (same source, same key) before anything is read or rendered."""
    for t in things:
        if t.key and tables.seen.get(t.source) == t.key:
            stats["skipped"] += 1
            continue
        if isinstance(t, Rejected):
            stats["boxes_read"] += t.boxes
        else:
            stats["boxes_read"] += len(t.boxes or []) + sum(r.boxes for r in t.box_rejects)
        if isinstance(t, Item) and t.read_in_order and t.data is None and t.read is not None:
            try:
                t.data = t.read()  # archive entries: read while the reader sits on them
            except ImageReject as e:
                yield Rejected(t.source, e.reason, e.detail, key=t.key)
                continue
        yield t


def _reject(tables: _Tables, r: Rejected, reasons: Counter, result: CollectResult, src: _SourceCounts | None) -> None:
    tables.new["rejects"].append(
        {"source": r.source, "reason": r.reason, "detail": r.detail, "sha256": r.sha256, "rejected_at": _now()}
    )
    reasons[r.reason] += 1
    if r.reason not in (DUPLICATE,):
        result.boxes_rejected += r.boxes
    if src is not None and r.reason not in (BAD_BOX, images.BAD_ANNOTATION, images.CROWD):
        src.rejected += 1
    tables.dirty = True


def _attach(out: _Outcome, sha: str, tables: _Tables, result: CollectResult, src: _SourceCounts) -> tuple[int, int]:
    """Add the item's human boxes, image label and truth to ``sha``, each only where ``sha`` has none yet.

    Returns (boxes added, boxes not added because the image already has human labels). "Has none yet" is
    what makes a resumed run safe (its labels may be written while its manifest row was not) and what keeps an
    exact duplicate's second annotation from doubling the first.
    """
    item = out.item
    assert isinstance(item, Item)
    added = skipped = 0
    if item.boxes is not None:
        if sha in tables.human_shas:
            skipped = len(out.boxes)
        else:
            for box in out.boxes:
                bid = tables.next_box[(sha, "human")]
                tables.next_box[(sha, "human")] += 1
                tables.new["human"].append(_label_row(sha, bid, box, "human"))
                added += 1
            tables.human_shas.add(sha)  # labeled, even with no boxes (a background image)
    if item.image_label is not None and sha not in tables.image_label_shas:
        name, label_id = item.image_label
        tables.new["image_labels"].append(
            {"sha256": sha, "label_id": label_id, "source_label": name, "origin": "human"}
        )
        tables.image_label_shas.add(sha)
        result.image_labels_added += 1
        src.image_labels += 1
    if out.truth and sha not in tables.truth_shas:
        for box in out.truth:
            bid = tables.next_box[(sha, "truth")]
            tables.next_box[(sha, "truth")] += 1
            tables.new["truth"].append(_label_row(sha, bid, box, "truth"))
            result.truth_boxes += 1
        tables.truth_shas.add(sha)
    result.boxes_imported += added
    src.boxes_imported += added
    return added, skipped


def _handle(
    out: _Outcome,
    tables: _Tables,
    known: set[str],
    near: _NearIndex,
    params: CollectParams,
    result: CollectResult,
    reasons: Counter,
    conversions: Counter,
    src: _SourceCounts,
) -> None:
    item = out.item
    if out.reject is not None:
        _reject(tables, out.reject, reasons, result, src)
        retry_later = isinstance(item, Item) and not item.final_on_fail and out.reject.reason == images.DOWNLOAD_FAILED
        if out.reject.key and not retry_later:
            tables.seen[out.reject.source] = out.reject.key
        return
    assert isinstance(item, Item)
    if item.render is not None and item.boxes:
        src.rendered_boxes += len(item.boxes)
    for r in out.bad_boxes:
        _reject(tables, r, reasons, result, src)
    sha = out.sha256
    tables.dirty = True
    conversions.update(n.split(":")[0] for n in out.notes)
    if sha in tables.kept_source:
        # Same pixels as an image already stored. The same source again (a resumed run whose seen index was not
        # written yet) is a re-index; another source is an exact duplicate, reported with the kept sha.
        self_match = tables.kept_source[sha] == item.source
        added, skipped = _attach(out, sha, tables, result, src)
        if SPLIT_RANK.get(item.split, 0) > SPLIT_RANK.get(tables.split[sha], 0):
            tables.split[sha] = tables.split_upgrades[sha] = item.split
        if not self_match:
            result.boxes_on_duplicates += skipped
            note = ""
            if added:
                note = f"; its {added} box(es) were attached to the kept image, which had no human labels"
            elif skipped:
                note = f"; its {skipped} box(es) were not imported: the kept image has its own labels"
            kept = tables.kept_source[sha]
            dup = Rejected(item.source, DUPLICATE, f"same pixels as {kept}{note}", sha256=sha)
            _reject(tables, dup, reasons, result, None)
            src.duplicates += 1
        tables.seen[item.source], tables.seen_sha[item.source] = item.key, sha
        return
    if not out.written:
        result.images_reindexed += 1
    known.add(sha)
    tables.kept_source[sha] = item.source
    tables.split[sha] = item.split
    tables.new["manifest"].append(
        {
            "sha256": sha,
            "path": out.path,
            "source": item.source,
            "width": out.width,
            "height": out.height,
            "format": out.format,
            "bytes": out.nbytes,
            "ingested_at": _now(),
            "split": item.split,
            "phash": out.phash,
        }
    )
    _attach(out, sha, tables, result, src)
    match = near.add(sha, out.phash, params.near_dup_distance)
    if match is not None:
        tables.new["near"].append({"sha256": sha, "near_sha256": match[0], "distance": match[1]})
        result.near_duplicates += 1
    tables.seen[item.source], tables.seen_sha[item.source] = item.key, sha
    result.images_added += 1
    src.added += 1


def write_world(uri: str, ontology: Ontology, world_dir: Path) -> Path:
    """The sample world's side corpora (expert catalogue, generic detection set), once per world spec.

    A stamp holding the spec's URI makes a re-run skip them without listing thousands of files.
    """
    from wanwu import sample_world as sw

    spec = sw.WorldSpec.from_uri(uri)
    stamp = world_dir / ".collected"
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == spec.uri:
        return world_dir
    sw.write_catalogue(spec, ontology, world_dir / "catalogue")
    sw.write_generic(spec, world_dir / "generic")
    stamp.write_text(spec.uri + "\n", encoding="utf-8")
    return world_dir


# ---- entry points -------------------------------------------------------------------------------------
def _short(uri: str, width: int = 48) -> str:
    if "://" in uri or len(uri) <= width:
        return uri
    try:
        rel = str(Path(uri).relative_to(Path.cwd()))
        if len(rel) <= width:
            return rel
    except ValueError:
        pass
    return "…" + uri[-(width - 1) :]


def print_summary(result: CollectResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    t = Table(title=f"collect: {result.images_added} added, {result.images_total} stored ({result.seconds:.1f} s)")
    t.add_column("source", no_wrap=True, max_width=48, overflow="ellipsis")
    for col in ("format", "added", "dup", "rejected", "skipped", "boxes read", "boxes in", "img labels"):
        t.add_column(col, justify="right" if col != "format" else "left")
    for s in result.per_source:
        t.add_row(
            _short(s["uri"]),
            s["format"],
            str(s["added"]),
            str(s["duplicates"]),
            str(s["rejected"]),
            str(s["skipped"]),
            str(s["boxes_read"]),
            str(s["boxes_imported"]),
            str(s["image_labels"]),
        )
    console.print(t)
    if result.rejects_by_reason:
        console.print(
            "rejects: " + ", ".join(f"{k} {v}" for k, v in result.rejects_by_reason.items()) + f"  → {result.rejects}"
        )
    if result.conversions:
        console.print("kept after conversion: " + ", ".join(f"{k} {v}" for k, v in result.conversions.items()))
    if result.near_duplicates:
        console.print(f"near-duplicates (kept): {result.near_duplicates} → {result.near_duplicates_table}")
    if result.boxes_on_duplicates:
        console.print(f"boxes on exact-duplicate images, not imported: {result.boxes_on_duplicates}")
    console.print(f"manifest → {result.manifest}   human labels → {result.human_labels}")


def run_stage(params: Params) -> CollectResult:
    """`wanwu stage collect`: run with the params' own sections and print the summary."""
    result = run(params.collect, params.project)
    print_summary(result)
    return result


def _task() -> Any:
    import prefect
    from prefect.cache_policies import NO_CACHE

    # No input caching: the sources are outside Prefect's view (a folder gains files, a URL list changes), and the
    # stage's own skip index already makes a re-run cheap. One retry is safe: a run resumes where it stopped.
    return prefect.task(run, name="collect", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)


__getattr__ = lazy_task(globals(), "collect", _task)
