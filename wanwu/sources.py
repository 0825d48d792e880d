"""Where images come from: folders, globs, archives, URL lists, ``sample://`` and labeled datasets.

Each reader turns one :class:`~wanwu.config.SourceSpec` into a stream of :class:`Item` (one picture to decode,
with any human boxes or image-level label it carries) and :class:`Rejected` (something that is not even a
picture to try: an archive entry escaping its folder, a label file whose image is missing, an annotation that
points at nothing). Readers never decode pixels; the collect stage does that in a thread pool, so a reader stays
cheap enough that a re-run can list every source and skip what it has seen by ``(source, key)``.

Labeled formats read as they are on disk:

* **YOLO**: ``images/…`` with ``labels/…/<stem>.txt`` (``class cx cy w h`` normalised, or a polygon), class names
  from a ``*.yaml`` beside them (``names`` as a list or mapping). Boxes are taken in the EXIF-oriented frame,
  as ultralytics (OpenCV) reads the image.
* **Pascal VOC**: ``annotations/*.xml`` (or ``Annotations/``) and ``images/`` (or ``JPEGImages/``). Pixel
  coordinates are taken as written. When the XML's ``<size>`` is the file's raw size and the EXIF rotation
  swaps the sides, the boxes are rotated with the image.
* **COCO**: a ``*.json`` with ``images``, ``annotations``, ``categories``; ``bbox`` is ``[x, y, w, h]``.
  ``iscrowd`` regions are not boxes of one object and are rejected with reason ``crowd``.
* **folders**: ``root/<class>/*.jpg`` or ``root/<split>/<class>/*.jpg``: the parent folder names the class.

Class names go through ``SourceSpec.class_map`` then :meth:`Ontology.lookup`; a name that maps to nothing is
kept with label id −1 (other), so nothing a human drew is silently dropped.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import yaml

from wanwu.config import SourceSpec
from wanwu.images import (
    BAD_ANNOTATION,
    CROWD,
    DOWNLOAD_FAILED,
    MISSING_FILE,
    TOO_LARGE,
    UNREADABLE,
    UNSAFE_PATH,
    ImageReject,
)
from wanwu.ontology import OTHER_ID, Ontology, UnknownLabel, normalize_name

IMAGE_EXTS = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLIT_RANK = {"pool": 0, "seed": 1, "gold": 2}
LABELED_FORMATS = {"yolo", "voc", "coco", "folders"}


class SourceError(ValueError):
    """A source in params cannot be read at all (missing folder, unknown class-map target); names it and the fix."""


@dataclass
class RawBox:
    """A box as a dataset wrote it, before it is placed on the stored (oriented) image."""

    x1: float
    y1: float
    x2: float
    y2: float
    name: str  # the dataset's class name: becomes source_label
    label_id: int  # ontology id after the class map, −1 = other
    normalized: bool = False  # YOLO: fractions of the oriented image
    declared_size: tuple[int, int] | None = None  # the annotation's own idea of (width, height)
    ref: str = ""  # where it was written, for reject rows ("labels/a.txt:3")


@dataclass
class Item:
    """One picture to decode and store."""

    source: str  # manifest/rejects `source`: a path, URL, archive!entry or sample://…#index
    split: str  # pool | seed | gold
    key: str  # cheap identity (size:mtime, …): a re-run skips (source, key) pairs it has seen
    read: Callable[[], bytes] | None = None  # lazy bytes (runs in a worker thread unless read_in_order)
    read_in_order: bool = False  # archives: read while the reader is positioned on the entry
    data: bytes | None = None
    render: Callable[[], tuple[Any, list[RawBox]]] | None = None  # sample world: (PIL image, truth boxes)
    size: int | None = None  # known size in bytes: too-large files are rejected unread
    boxes: list[RawBox] | None = None  # human boxes; None = unlabeled, [] = labeled with no objects
    image_label: tuple[str, int] | None = None  # (class name, ontology id) for class-folder datasets
    box_rejects: list[Rejected] = field(default_factory=list)  # unreadable annotation lines of this image
    final_on_fail: bool = True  # False for downloads: a failed one is retried on the next run


@dataclass
class Rejected:
    source: str
    reason: str
    detail: str
    key: str = ""
    sha256: str | None = None
    boxes: int = 0  # human boxes lost with it


Thing = Item | Rejected


# ---- class names → ontology ids -----------------------------------------------------------------------
class ClassMapper:
    """``class_map`` first (checked up front, so a typo fails the run before any work), then the ontology."""

    def __init__(self, class_map: dict[str, str], ontology: Ontology, where: str = "class_map"):
        self.ontology = ontology
        self._map: dict[str, int] = {}
        for src, dst in class_map.items():
            if normalize_name(dst) in ("other", "其他", "-1"):
                self._map[normalize_name(src)] = OTHER_ID
                continue
            try:
                self._map[normalize_name(src)] = ontology.lookup(dst)
            except UnknownLabel as e:
                raise SourceError(
                    f"{where}: {src!r} → {dst!r}: {e} Fix the target name, or map it to 'other' on purpose."
                ) from None
        self._cache: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self._cache:
            key = normalize_name(name)
            self._cache[name] = self._map[key] if key in self._map else self.ontology.lookup_or_other(name)
        return self._cache[name]


# ---- helpers --------------------------------------------------------------------------------------------
def _file_key(path: Path, extra: str = "") -> tuple[str, int]:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}{':' + extra if extra else ''}", st.st_size


def _reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise ImageReject(UNREADABLE, f"{type(e).__name__}: {e}") from None

    return read


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _walk(root: Path) -> Iterator[Path]:
    """Files under root in a stable order, hidden files and folders left out (.DS_Store, caches)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def split_for(spec: SourceSpec, fmt: str) -> str:
    if spec.role != "auto":
        return spec.role
    return "seed" if fmt in LABELED_FORMATS else "pool"


def _label_sig(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "-"
    st = path.stat()
    return f"{st.st_size}.{st.st_mtime_ns}"


# ---- format detection -----------------------------------------------------------------------------------
def _yaml_with_names(folder: Path) -> Path | None:
    for p in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(raw, dict) and "names" in raw:
            return p
    return None


def _coco_json(folder: Path) -> Path | None:
    for p in sorted([*folder.glob("*.json"), *folder.glob("annotations/*.json")]):
        if _looks_coco(p):
            return p
    return None


def _looks_coco(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return b'"images"' in head or b'"annotations"' in head


def _voc_dir(folder: Path) -> Path | None:
    for name in ("annotations", "Annotations"):
        d = folder / name
        if d.is_dir() and any(d.glob("*.xml")):
            return d
    return None


def detect_format(uri: str) -> str:
    """What kind of source a uri is, when params say ``format: auto``."""
    if uri.startswith("sample://"):
        return "sample"
    if uri.startswith(("http://", "https://")):
        return "urls"
    if any(ch in uri for ch in "*?["):
        return "images"
    p = Path(uri)
    if p.is_file():
        name = p.name.lower()
        if name.endswith(".txt"):
            return "urls"
        if is_archive_name(name):
            return "archive"
        if name.endswith(".json"):
            return "coco"
        if name.endswith((".yaml", ".yml")):
            return "yolo"
        return "images"
    if p.is_dir():
        if _yaml_with_names(p) is not None and (p / "labels").is_dir():
            return "yolo"
        if _voc_dir(p) is not None:
            return "voc"
        if _coco_json(p) is not None:
            return "coco"
        return "images"
    raise SourceError(f"source {uri!r}: no such file or folder. Fix the path in params.yaml collect.sources.")


def check_source(spec: SourceSpec, ontology: Ontology) -> None:
    """Fail before any work on what would fail later: a missing path, a bad sample URI, a class-map typo."""
    ClassMapper(spec.class_map, ontology)
    if spec.uri.startswith("sample://") or spec.format == "sample":
        from wanwu import sample_world as sw

        try:
            sw.WorldSpec.from_uri(spec.uri)
        except sw.SampleWorldError as e:
            raise SourceError(str(e)) from None
    elif _is_path(spec.uri) and not Path(spec.uri).exists():
        raise SourceError(f"no such file or folder {spec.uri!r}. Fix the path in params.yaml collect.sources.")


def _is_path(uri: str) -> bool:
    return "://" not in uri and not any(ch in uri for ch in "*?[")


# ---- readers --------------------------------------------------------------------------------------------
def iter_source(spec: SourceSpec, ontology: Ontology, stats: Counter, *, max_bytes: int) -> Iterator[Thing]:
    """All items and early rejects of one source. ``stats`` gets counts: files_ignored, urls, …"""
    fmt = spec.format if spec.format != "auto" else detect_format(spec.uri)
    if fmt == "sample":
        yield from iter_sample(spec, ontology, stats)
        return
    stats["format:" + fmt] += 1
    split = split_for(spec, fmt)
    mapper = ClassMapper(spec.class_map, ontology)
    if fmt == "urls":
        if spec.uri.startswith(("http://", "https://")):
            yield Item(source=spec.uri, split=split, key="url", final_on_fail=False)
            return
        yield from iter_url_list(Path(spec.uri), split, stats)
    elif fmt == "archive":
        yield from iter_archive(Path(spec.uri), split, stats, max_bytes=max_bytes)
    elif fmt == "images":
        yield from iter_images(spec.uri, split, stats, max_bytes=max_bytes)
    elif fmt == "yolo":
        yield from iter_yolo(Path(spec.uri), split, mapper, stats)
    elif fmt == "voc":
        yield from iter_voc(Path(spec.uri), split, mapper, stats)
    elif fmt == "coco":
        yield from iter_coco(Path(spec.uri), split, mapper, stats)
    elif fmt == "folders":
        yield from iter_class_folders(Path(spec.uri), split, mapper, stats)
    else:  # pragma: no cover - Literal in config forbids it
        raise SourceError(f"source {spec.uri!r}: unknown format {fmt!r}")


def _file_item(path: Path, split: str, **kw: Any) -> Item:
    key, size = _file_key(path, kw.pop("key_extra", ""))
    return Item(source=str(path), split=split, key=key, read=_reader(path), size=size, **kw)


def iter_images(uri: str, split: str, stats: Counter, *, max_bytes: int) -> Iterator[Thing]:
    """A folder (recursive), one file or a glob; archives found on the way are read entry by entry."""
    if any(ch in uri for ch in "*?["):
        matches = sorted(glob.glob(uri, recursive=True))
        if not matches:
            stats["glob_matched_nothing"] += 1
        paths: list[Path] = []
        for m in matches:
            p = Path(m)
            paths.extend(_walk(p) if p.is_dir() else [p])
    else:
        p = Path(uri)
        if not p.exists():
            raise SourceError(f"source {uri!r}: no such file or folder. Fix the path in params.yaml collect.sources.")
        paths = list(_walk(p)) if p.is_dir() else [p]
    for path in paths:
        if not path.is_file():
            continue
        if is_image_name(path.name):
            yield _file_item(path, split)
        elif is_archive_name(path.name):
            yield from iter_archive(path, split, stats, max_bytes=max_bytes)
        else:
            stats["files_ignored"] += 1


# -- archives
def unsafe_entry_name(name: str) -> str | None:
    """Why an archive member name would escape the folder it is unpacked into, or None when it is safe."""
    n = name.replace("\\", "/")
    if "\x00" in n:
        return "NUL byte in the name"
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        return "absolute path"
    if ".." in n.split("/"):
        return "'..' climbs out of the folder"
    return None


def iter_archive(path: Path, split: str, stats: Counter, *, max_bytes: int) -> Iterator[Thing]:
    """Entries of a zip or tar, read in memory one at a time: nothing is extracted to disk by name."""
    akey, _ = _file_key(path)
    try:
        if zipfile.is_zipfile(path):
            yield from _iter_zip(path, split, stats, akey, max_bytes)
        elif tarfile.is_tarfile(path):
            yield from _iter_tar(path, split, stats, akey, max_bytes)
        else:
            yield Rejected(str(path), "not_image", "named like an archive but neither zip nor tar", key=akey)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        yield Rejected(str(path), "truncated", f"archive unreadable part-way: {type(e).__name__}: {e}", key=akey)


def _limited_read(f: Any, limit: int) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageReject(TOO_LARGE, f"more than max_bytes {limit} once decompressed (read stopped there)")
    return data


def _iter_zip(path: Path, split: str, stats: Counter, akey: str, max_bytes: int) -> Iterator[Thing]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            source = f"{path}!{info.filename}"
            why = unsafe_entry_name(info.filename)
            mode = info.external_attr >> 16
            if why is None and stat.S_ISLNK(mode):
                why = "symbolic link"
            if why:
                yield Rejected(source, UNSAFE_PATH, f"archive entry {info.filename!r}: {why}; not read", key=akey)
                continue
            if not is_image_name(info.filename):
                stats["files_ignored"] += 1
                continue

            def read(info: zipfile.ZipInfo = info) -> bytes:
                if info.file_size > max_bytes:
                    raise ImageReject(TOO_LARGE, f"{info.file_size} bytes > max_bytes {max_bytes}")
                with zf.open(info) as f:
                    return _limited_read(f, max_bytes)

            yield Item(source=source, split=split, key=akey, read=read, read_in_order=True)


def _iter_tar(path: Path, split: str, stats: Counter, akey: str, max_bytes: int) -> Iterator[Thing]:
    with tarfile.open(path, mode="r:*") as tf:
        for member in tf:
            if member.isdir():
                continue
            source = f"{path}!{member.name}"
            why = unsafe_entry_name(member.name)
            if why is None and (member.issym() or member.islnk()):
                why = f"{'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}"
            if why is None and not member.isfile():
                why = "not a regular file (device or fifo)"
            if why:
                yield Rejected(source, UNSAFE_PATH, f"archive entry {member.name!r}: {why}; not read", key=akey)
                continue
            if not is_image_name(member.name):
                stats["files_ignored"] += 1
                continue

            def read(member: tarfile.TarInfo = member) -> bytes:
                if member.size > max_bytes:
                    raise ImageReject(TOO_LARGE, f"{member.size} bytes > max_bytes {max_bytes}")
                f = tf.extractfile(member)
                if f is None:
                    raise ImageReject(UNREADABLE, "tar member has no data")
                return _limited_read(f, max_bytes)

            yield Item(source=source, split=split, key=akey, read=read, read_in_order=True)


# -- URL lists
def iter_url_list(path: Path, split: str, stats: Counter) -> Iterator[Thing]:
    """One http(s) URL a line; blank lines and # comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the URL list ({e}).") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        url = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            yield Rejected(url, DOWNLOAD_FAILED, f"{path}:{lineno}: only http(s) URLs are fetched", key="url")
            continue
        stats["urls"] += 1
        yield Item(source=url, split=split, key="url", final_on_fail=False)


def fetch(url: str, *, timeout: float, retries: int, max_bytes: int, backoff: float = 0.25) -> bytes:
    """GET a URL with a timeout, retries with exponential backoff on timeouts/5xx, and a streamed size limit."""
    import httpx

    last = "not tried"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
                if not 200 <= r.status_code < 300:
                    last = f"HTTP {r.status_code} {r.reason_phrase}".strip()
                    if r.status_code in (408, 429) or r.status_code >= 500:
                        continue
                    raise ImageReject(DOWNLOAD_FAILED, f"{last} from {url}")
                length = r.headers.get("content-length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise ImageReject(TOO_LARGE, f"Content-Length {length} > max_bytes {max_bytes}; not downloaded")
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise ImageReject(TOO_LARGE, f"body passed max_bytes {max_bytes}; download stopped")
                return bytes(buf)
        except httpx.TimeoutException as e:
            last = f"timeout after {timeout:g} s ({type(e).__name__})"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
    raise ImageReject(DOWNLOAD_FAILED, f"{last} (after {retries + 1} attempt{'s' * bool(retries)})")


# -- YOLO
def _yolo_names(path: Path) -> tuple[dict[int, str], Path | None]:
    yml = path if path.is_file() else _yaml_with_names(path)
    if yml is None:
        return {}, None
    raw = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
    names = raw.get("names", {})
    if isinstance(names, list):
        return dict(enumerate(str(n) for n in names)), yml
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}, yml
    raise SourceError(f"{yml}: `names` must be a list or a mapping of id → name, got {type(names).__name__}")


def _yolo_label_path(img: Path) -> Path:
    parts = list(img.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return img.with_suffix(".txt")


def _yolo_image_for(label: Path) -> Path | None:
    parts = list(label.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            break
    base = Path(*parts)
    for ext in IMAGE_EXTS | {e.upper() for e in IMAGE_EXTS}:
        cand = base.with_suffix(ext)
        if cand.is_file():
            return cand
    return None


def _parse_yolo(
    label: Path, names: dict[int, str], mapper: ClassMapper, yml: Path | None
) -> tuple[list[RawBox], list[Rejected]]:
    boxes: list[RawBox] = []
    bad: list[Rejected] = []
    try:
        text = label.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [Rejected(str(label), BAD_ANNOTATION, f"label file unreadable: {e}")]
    for lineno, line in enumerate(text.splitlines(), 1):
        vals = line.split()
        if not vals:
            continue
        ref = f"{label}:{lineno}"
        try:
            cls = int(float(vals[0]))
            nums = [float(v) for v in vals[1:]]
        except ValueError:
            bad.append(Rejected(ref, BAD_ANNOTATION, f"not numbers: {line.strip()!r}", boxes=1))
            continue
        if len(nums) == 4:
            cx, cy, w, h = nums
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        elif len(nums) >= 6 and len(nums) % 2 == 0:  # a segment polygon: its bounding box
            xs, ys = nums[0::2], nums[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        else:
            bad.append(Rejected(ref, BAD_ANNOTATION, f"expected 'class cx cy w h', got {len(vals)} values", boxes=1))
            continue
        if names and cls not in names:
            where = yml.name if yml else "the names"
            bad.append(
                Rejected(
                    ref,
                    BAD_ANNOTATION,
                    f"class id {cls} is not in {where} (0..{max(names)}). Fix: add id {cls} to `names` in {yml}, "
                    "or correct the id on this line.",
                    boxes=1,
                )
            )
            continue
        name = names.get(cls, str(cls))
        boxes.append(RawBox(x1, y1, x2, y2, name=name, label_id=mapper(name), normalized=True, ref=ref))
    return boxes, bad


def iter_yolo(path: Path, split: str, mapper: ClassMapper, stats: Counter) -> Iterator[Thing]:
    names, yml = _yolo_names(path)
    root = path.parent if path.is_file() else path
    if yml is None:
        stats["yolo_no_names"] += 1  # class ids become names "0", "1", … (map them with class_map)
    images_dir = root / "images"
    image_paths = [p for p in _walk(images_dir if images_dir.is_dir() else root) if is_image_name(p.name)]
    pairs = [(img, _yolo_label_path(img)) for img in image_paths]
    seen_labels = {label.resolve() for _, label in pairs if label.is_file()}
    labels_dir = root / "labels"
    orphans = [
        label
        for label in (_walk(labels_dir) if labels_dir.is_dir() else [])
        if label.suffix == ".txt"
        and label.name != "classes.txt"
        and label.resolve() not in seen_labels
        and _yolo_image_for(label) is None  # an image outside images/ is read by another source
    ]
    if orphans and not seen_labels:
        # Not one image found its label file: every image would enter as a labeled background (no objects).
        raise SourceError(
            f"{labels_dir}: {len(orphans)} label file(s) but not one matches an image under "
            f"{images_dir if images_dir.is_dir() else root} (e.g. {orphans[0].relative_to(root)} expects "
            f"{Path(_yolo_image_for_hint(orphans[0])).relative_to(root)}; {len(image_paths)} image(s) found). "
            "Fix: mirror the images/ folders under labels/ with one <image stem>.txt per image, or point the "
            "source at the dataset folder that holds both images/ and labels/."
        )
    for img, label in pairs:
        if label.is_file():
            boxes, bad = _parse_yolo(label, names, mapper, yml)
        else:
            boxes, bad = [], []  # no label file: a background image, as ultralytics reads it
        yield _file_item(img, split, boxes=boxes, box_rejects=bad, key_extra=_label_sig(label))
    for label in orphans:
        n = sum(1 for line in label.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        yield Rejected(
            str(label),
            MISSING_FILE,
            f"label file with {n} box(es) but no image at {_yolo_image_for_hint(label)}. Fix: put the image there "
            "(same stem, any image extension), or delete the label file.",
            key=_file_key(label)[0],
            boxes=n,
        )


def _yolo_image_for_hint(label: Path) -> str:
    parts = list(label.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            break
    return str(Path(*parts).with_suffix(".*"))


# -- Pascal VOC
def _find_image(name: str, candidates: list[Path]) -> Path | None:
    for d in candidates:
        p = d / name
        if p.is_file():
            return p
        stem = Path(name).stem
        for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp"):
            q = d / (stem + ext)
            if q.is_file():
                return q
    return None


def _num(el: ElementTree.Element | None, tag: str) -> float:
    node = el.find(tag) if el is not None else None
    if node is None or node.text is None:
        raise ValueError(f"<{tag}> missing")
    return float(node.text.strip())


def iter_voc(path: Path, split: str, mapper: ClassMapper, stats: Counter) -> Iterator[Thing]:
    root = path
    ann_dir = _voc_dir(root)
    xmls = sorted(ann_dir.glob("*.xml")) if ann_dir else sorted(p for p in _walk(root) if p.suffix.lower() == ".xml")
    image_dirs = [root / "images", root / "JPEGImages", root]
    referenced: set[Path] = set()
    for xml in xmls:
        xkey = _file_key(xml)[0]
        try:
            tree = ElementTree.parse(xml).getroot()
        except (ElementTree.ParseError, OSError) as e:
            yield Rejected(
                str(xml), BAD_ANNOTATION, f"XML unreadable: {e}. Fix: repair or re-export the XML.", key=xkey
            )
            continue
        objects = tree.findall("object")
        fname = (tree.findtext("filename") or "").strip() or xml.stem
        img = _find_image(fname, [*image_dirs, xml.parent, xml.parent.parent / "images"])
        if img is None:
            yield Rejected(
                str(xml),
                MISSING_FILE,
                f"names image {fname!r}, not found in {', '.join(str(d) for d in image_dirs)}. Fix: put "
                f"{fname} in images/ (or JPEGImages/), or correct <filename> in this XML.",
                key=xkey,
                boxes=len(objects),
            )
            continue
        declared: tuple[int, int] | None = None
        try:
            size = tree.find("size")
            dw, dh = int(_num(size, "width")), int(_num(size, "height"))
            declared = (dw, dh) if dw > 0 and dh > 0 else None
        except ValueError:
            declared = None
        boxes: list[RawBox] = []
        bad: list[Rejected] = []
        for i, obj in enumerate(objects):
            ref = f"{xml}#object{i}"
            name = (obj.findtext("name") or "").strip()
            try:
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (_num(bb, t) for t in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as e:
                bad.append(Rejected(ref, BAD_ANNOTATION, f"object {name!r}: {e}", boxes=1))
                continue
            if not name:
                bad.append(Rejected(ref, BAD_ANNOTATION, "object without <name>", boxes=1))
                continue
            boxes.append(RawBox(x1, y1, x2, y2, name=name, label_id=mapper(name), declared_size=declared, ref=ref))
        referenced.add(img.resolve())
        yield _file_item(img, split, boxes=boxes, box_rejects=bad, key_extra=_label_sig(xml))
    # Images no annotation names are kept, unlabeled: an image without an XML is not known to be empty.
    for d in image_dirs[:2]:
        if d.is_dir():
            for img in _walk(d):
                if is_image_name(img.name) and img.resolve() not in referenced:
                    stats["unannotated_images"] += 1
                    yield _file_item(img, "pool")


# -- COCO
def iter_coco(path: Path, split: str, mapper: ClassMapper, stats: Counter) -> Iterator[Thing]:
    js = path if path.is_file() else _coco_json(path)
    if js is None:
        raise SourceError(f"{path}: no COCO json (a file with 'images' and 'annotations') found here.")
    jkey = _file_key(js)[0]
    try:
        data = json.loads(js.read_text(encoding="utf-8"))
        images = {int(im["id"]): im for im in data["images"]}
        cats = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        anns = data.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        yield Rejected(
            str(js),
            BAD_ANNOTATION,
            f"not a readable COCO json ({type(e).__name__}: {e}). Fix: export it again as COCO instances json "
            "(a mapping with `images`, `annotations` and `categories`).",
            key=jkey,
        )
        return
    by_image: dict[int, list[RawBox]] = {i: [] for i in images}
    bad_by_image: dict[int, list[Rejected]] = {i: [] for i in images}
    early: list[Rejected] = []  # annotations that belong to no image
    stray_images: list[int] = []
    stray_cats: list[int] = []
    for k, ann in enumerate(anns):
        ref = f"{js}#annotation{ann.get('id', k)}"
        try:
            image_id = int(ann["image_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
            cat = int(ann["category_id"])
        except (KeyError, ValueError, TypeError) as e:
            early.append(
                Rejected(
                    ref,
                    BAD_ANNOTATION,
                    f"{js.name}: annotation {k} unreadable ({type(e).__name__}: {e}). Fix: give it image_id, "
                    "category_id and bbox [x, y, width, height] as numbers.",
                    key=jkey,
                    boxes=1,
                )
            )
            continue
        if image_id not in images:
            stray_images.append(image_id)
            early.append(
                Rejected(
                    ref,
                    BAD_ANNOTATION,
                    f"{js.name}: annotation {ann.get('id', k)} has image_id {image_id}, which no entry of `images` "
                    "has. Fix: add that image to `images`, or correct the annotation's image_id.",
                    key=jkey,
                    boxes=1,
                )
            )
            continue
        if cat not in cats:
            stray_cats.append(cat)
            bad_by_image[image_id].append(
                Rejected(
                    ref,
                    BAD_ANNOTATION,
                    f"{js.name}: annotation {ann.get('id', k)} has category_id {cat}, which is not in `categories` "
                    f"(ids {_id_range(cats)}). Fix: add category {cat} to `categories`, or correct the category_id.",
                    boxes=1,
                )
            )
            continue
        if ann.get("iscrowd"):
            bad_by_image[image_id].append(
                Rejected(ref, CROWD, "iscrowd=1: a region of many objects, not one object's box", boxes=1)
            )
            continue
        im = images[image_id]
        declared = (int(im.get("width") or 0), int(im.get("height") or 0))
        name = cats[cat]
        by_image[image_id].append(
            RawBox(
                x,
                y,
                x + w,
                y + h,
                name=name,
                label_id=mapper(name),
                declared_size=declared if all(declared) else None,
                ref=ref,
            )
        )
    # Ids that match nothing at all mean the parts come from different files: importing the images would label
    # every one of them "no objects", so the whole file is refused instead of rejected box by box.
    if anns and len(stray_images) == len(anns):
        raise SourceError(
            f"{js}: not one of its {len(anns)} annotations has an image_id that is in `images` (annotations point "
            f"at ids {_id_range(stray_images)}, `images` has {_id_range(images)}). Fix: use the json whose `images` "
            "and `annotations` were exported together, or renumber one side so the ids match."
        )
    placed = len(anns) - len(early)
    if placed and len(stray_cats) == placed:
        raise SourceError(
            f"{js}: not one of its annotations has a category_id that is in `categories` (annotations use "
            f"{_id_range(stray_cats)}, `categories` has {_id_range(cats) if cats else 'none'}). Fix: add the "
            "`categories` list these annotations were made with, or correct their category_id."
        )
    yield from early
    dirs = [js.parent, js.parent / "images", js.parent.parent / "images", js.parent.parent]
    if path.is_dir():
        dirs = [path / "images", path, *dirs]
    for image_id, im in images.items():
        fname = str(im.get("file_name", ""))
        img = next((d / fname for d in dirs if (d / fname).is_file()), None) if fname else None
        if img is None:
            n = len(by_image[image_id]) + len(bad_by_image[image_id])
            yield Rejected(
                f"{js}#image{image_id}",
                MISSING_FILE,
                f"{js.name}: image {image_id} file_name {fname!r} not found beside the json or in images/. "
                f"Fix: put the file in {js.parent / 'images'}, or correct its file_name.",
                key=jkey,
                boxes=n,
            )
            continue
        yield _file_item(img, split, boxes=by_image[image_id], box_rejects=bad_by_image[image_id], key_extra=jkey)


def _id_range(ids: Any) -> str:
    """A few ids for a message: ``1..3`` for a run, else the first ones."""
    u = sorted(set(ids))
    if not u:
        return "none"
    if len(u) > 2 and u[-1] - u[0] == len(u) - 1:
        return f"{u[0]}..{u[-1]}"
    return ", ".join(map(str, u[:5])) + (f", … ({len(u)} ids)" if len(u) > 5 else "")


# -- class folders
def iter_class_folders(path: Path, split: str, mapper: ClassMapper, stats: Counter) -> Iterator[Thing]:
    """``root/<class>/x.jpg`` or ``root/<split>/<class>/x.jpg``: the image's parent folder names its class."""
    if not path.is_dir():
        raise SourceError(f"{path}: format 'folders' needs a folder of class folders.")
    for img in _walk(path):
        if not is_image_name(img.name):
            stats["files_ignored"] += 1
            continue
        if img.parent == path:
            yield _file_item(img, "pool")  # no class folder: unlabeled
            continue
        name = img.parent.name
        yield _file_item(img, split, image_label=(name, mapper(name)))


# -- the sample world
def iter_sample(spec: SourceSpec, ontology: Ontology, stats: Counter) -> Iterator[Thing]:
    """Scenes of ``sample://?n=…&seed=…`` as lazy items: a scene is rendered (in a worker) only when not seen.

    Each scene takes its own role (seed / gold / pool) whatever ``role`` says: the world decides who is labeled.
    Seed and gold scenes carry their ontology objects as human boxes (a human labels only ontology classes, not
    distractors); every scene carries all its objects as truth.
    """
    from wanwu import sample_world as sw

    try:
        world = sw.WorldSpec.from_uri(spec.uri)
    except sw.SampleWorldError as e:
        raise SourceError(str(e)) from None
    stats["format:sample"] += 1

    def render(index: int) -> tuple[Any, list[RawBox]]:
        scene = sw.render_scene(world, index, ontology)
        truth = [RawBox(b.x1, b.y1, b.x2, b.y2, name=b.name, label_id=b.label_id, ref=scene.uri) for b in scene.boxes]
        return scene.image, truth

    for index in range(world.n):
        role = sw.scene_role(world, index)
        yield Item(
            source=world.scene_uri(index),
            split=role if role in SPLIT_RANK else "pool",
            key="sample",
            render=lambda index=index: render(index),
            boxes=[] if role in ("seed", "gold") else None,
        )


def sample_world_spec(uri: str) -> Any:
    from wanwu import sample_world as sw

    return sw.WorldSpec.from_uri(uri)
