"""Decode, check and normalize one image: the only place wanwu opens an image file it did not write itself.

Every input ends in one of two ways: a :class:`Normalized` RGB 8-bit picture, EXIF-oriented, with its identity
(``sha256`` of the pixels plus the size, so the same picture in PNG and BMP is one image), or an
:class:`ImageReject` with a short reason code and a human detail. Conversions that lose nothing a detector needs
(CMYK, 16-bit, grayscale, palette/alpha, EXIF rotation, animation) are done and noted, never rejected.

Transparent pixels are composited on **white**: that is how a browser shows a transparent PNG on a page, and
product shots and sprites with alpha are drawn for a light background; black would merge with dark objects.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from wanwu import contracts

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, not a grey-bottomed image

ORIENTATION_TAG = 0x0112
BACKGROUND = (255, 255, 255)  # alpha is composited on white (see the module docstring)

# Reason codes: one vocabulary for the rejects table (contracts "rejects".reason).
EMPTY = "empty"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
NOT_IMAGE = "not_image"
TOO_LARGE = "too_large"
BOMB = "bomb"
TOO_SMALL = "too_small"
DUPLICATE = "duplicate"
UNSAFE_PATH = "unsafe_path"
DOWNLOAD_FAILED = "download_failed"
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"
BAD_BOX = "bad_box"
BAD_ANNOTATION = "bad_annotation"
CROWD = "crowd"
REASONS = {
    EMPTY: "zero-byte file",
    TRUNCATED: "the file ends before the image does",
    CORRUPT: "the image data cannot be decoded",
    NOT_IMAGE: "not an image format Pillow knows",
    TOO_LARGE: "file larger than collect.max_bytes",
    BOMB: "width × height above collect.max_pixels (decompression bomb guard)",
    TOO_SMALL: "a side shorter than collect.min_side",
    DUPLICATE: "the same pixels are already stored (sha256 column: the kept image)",
    UNSAFE_PATH: "archive entry escaping its folder (.., absolute path or link)",
    DOWNLOAD_FAILED: "HTTP error status, timeout or connection failure",
    MISSING_FILE: "a label file names an image that is not there",
    UNREADABLE: "the file could not be read (permissions, vanished)",
    BAD_BOX: "a box with no area after clipping to the image",
    BAD_ANNOTATION: "an annotation that cannot be read or points at nothing",
    CROWD: "a COCO iscrowd region: many objects under one box, not imported as a box",
}


class ImageReject(Exception):
    """An input that is not stored; ``reason`` is a code from REASONS, ``detail`` says why in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Normalized:
    image: Image.Image  # RGB, 8 bit, oriented
    sha256: str
    width: int
    height: int
    format: str  # the original container, e.g. JPEG, PNG, GIF
    bytes: int  # the original size in bytes (0 for rendered images)
    orientation: int = 1  # the EXIF orientation that was applied (1 = none)
    raw_size: tuple[int, int] = (0, 0)  # width, height before orientation
    notes: list[str] = field(default_factory=list)  # conversions done, e.g. "cmyk→rgb"


def pixel_sha256(image: Image.Image) -> str:
    """Identity of a picture: its RGB 8-bit pixels and size, whatever the container it came in."""
    h = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def phash_hex(image: Image.Image) -> str:
    import imagehash

    return str(imagehash.phash(image))


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "CMYK":
        notes.append("cmyk→rgb")
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr8 = ((arr - lo) / (hi - lo or 1.0) * 255.0).clip(0, 255).astype(np.uint8)
            notes.append("float→8-bit")
        else:
            arr = arr.astype(np.int64)
            # 16-bit data fills 0..65535; a 32-bit "I" image that only holds 8-bit values stays as it is.
            shift = 8 if arr.max(initial=0) > 255 else 0
            arr8 = (arr >> shift).clip(0, 255).astype(np.uint8)
            notes.append("16-bit→8-bit" if shift else "int→8-bit")
        notes.append("gray→rgb")
        return Image.fromarray(np.ascontiguousarray(arr8)).convert("RGB")
    if mode == "RGBA" or mode in ("LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("alpha→white")
        bg = Image.new("RGB", rgba.size, BACKGROUND)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        if mode.startswith("L"):
            notes.append("gray→rgb")
        return bg
    if mode in ("L", "1"):
        notes.append("gray→rgb")
    elif mode == "P":
        notes.append("palette→rgb")
    else:
        notes.append(f"{mode.lower()}→rgb")
    return img.convert("RGB")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # broken EXIF is not a broken image
        return 1


_warning_filtered = False


def _quiet_pillow_bomb_warning() -> None:
    """Pillow warns on images over its own pixel limit; max_pixels rejects them with a reason instead.

    Set once, process-wide: ``warnings.catch_warnings`` per call is not thread-safe.
    """
    global _warning_filtered
    if not _warning_filtered:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _warning_filtered = True


def pil_open() -> Callable[..., Any]:
    """Pillow's own ``Image.open``. ultralytics replaces it process-wide with a wrapper that, on a file Pillow cannot
    identify, tries to install and import pi-heif (ModuleNotFoundError offline) instead of raising
    UnidentifiedImageError: a file that is not an image must be rejected as not_image, not as corrupt."""
    if Image.open.__module__ != "PIL.Image":
        patches = sys.modules.get("ultralytics.utils.patches")
        original = getattr(patches, "_image_open", None)
        if original is not None and original.__module__ == "PIL.Image":
            return original
    return Image.open


def decode(data: bytes, *, max_pixels: int, min_side: int, max_bytes: int | None = None) -> Normalized:
    """Bytes of any image file → a checked, oriented RGB picture, or ImageReject saying why not."""
    n = len(data)
    if n == 0:
        raise ImageReject(EMPTY, "zero-byte file")
    if max_bytes is not None and n > max_bytes:
        raise ImageReject(TOO_LARGE, f"{n} bytes > max_bytes {max_bytes}")
    _quiet_pillow_bomb_warning()
    try:
        img = pil_open()(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageReject(BOMB, f"Pillow refused it: {e}") from None
    except UnidentifiedImageError:
        head = data[:16]
        raise ImageReject(NOT_IMAGE, f"not a known image format (first bytes {head!r})") from None
    except Exception as e:  # a header that lies or breaks the parser
        raise ImageReject(CORRUPT, f"header unreadable: {type(e).__name__}: {e}") from None
    fmt = img.format or "unknown"
    w, h = img.size
    # The bomb check reads the header only: nothing is decoded yet.
    if w * h > max_pixels:
        raise ImageReject(BOMB, f"{w}×{h} = {w * h} pixels > max_pixels {max_pixels} (from the header, not decoded)")
    notes: list[str] = []
    try:
        if getattr(img, "is_animated", False):
            frames = img.n_frames
            img.seek(0)
            notes.append(f"animated: first of {frames} frames")
        img.load()
        orientation = _orientation(img)
        rgb = _to_rgb(img, notes)
        if orientation != 1:
            rgb = _orient(rgb, orientation)
            notes.append(f"exif orientation {orientation} applied")
    except ImageReject:
        raise
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        truncated = "truncated" in str(e).lower() or isinstance(e, EOFError) or "broken" in str(e).lower()
        raise ImageReject(TRUNCATED if truncated else CORRUPT, msg) from None
    return _finish(rgb, fmt=fmt, nbytes=n, orientation=orientation, raw_size=(w, h), notes=notes, min_side=min_side)


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    """The same transposition as ImageOps.exif_transpose, applied to the already-converted RGB image."""
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def orient_box(
    box: tuple[float, float, float, float], orientation: int, raw_w: int, raw_h: int
) -> tuple[float, float, float, float]:
    """A box in the file's stored pixel frame → the same box in the EXIF-oriented frame."""
    if orientation == 1 or orientation not in _TRANSPOSE:
        return box
    x1, y1, x2, y2 = box
    W, H = raw_w, raw_h

    def f(x: float, y: float) -> tuple[float, float]:
        return {
            2: (W - x, y),
            3: (W - x, H - y),
            4: (x, H - y),
            5: (y, x),
            6: (H - y, x),
            7: (H - y, W - x),
            8: (y, W - x),
        }[orientation]

    ax, ay = f(x1, y1)
    bx, by = f(x2, y2)
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


def from_image(
    image: Image.Image, *, fmt: str = "RENDERED", min_side: int = 1, max_pixels: int | None = None
) -> Normalized:
    """An already-decoded picture (the sample world renders them) through the same checks and conversions."""
    w, h = image.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageReject(BOMB, f"{w}×{h} = {w * h} pixels > max_pixels {max_pixels}")
    notes: list[str] = []
    rgb = _to_rgb(image, notes)
    return _finish(rgb, fmt=fmt, nbytes=0, orientation=1, raw_size=(w, h), notes=notes, min_side=min_side)


def _finish(
    rgb: Image.Image,
    *,
    fmt: str,
    nbytes: int,
    orientation: int,
    raw_size: tuple[int, int],
    notes: list[str],
    min_side: int,
) -> Normalized:
    w, h = rgb.size
    if min(w, h) < min_side:
        raise ImageReject(TOO_SMALL, f"{w}×{h}: a side is shorter than min_side {min_side}")
    return Normalized(
        image=rgb,
        sha256=pixel_sha256(rgb),
        width=w,
        height=h,
        format=fmt,
        bytes=nbytes,
        orientation=orientation,
        raw_size=raw_size,
        notes=notes,
    )


def raw_relpath(sha256: str) -> str:
    """Where an image lives, relative to the data folder: raw/<sha[:2]>/<sha>.jpg."""
    return f"raw/{sha256[:2]}/{sha256}.jpg"


_JPEG_END = b"\xff\xd9"  # EOI: the last marker of a complete JPEG
_SWEPT: set[str] = set()


def _complete_jpeg(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(-2, os.SEEK_END)
            return f.read(2) == _JPEG_END
    except OSError:
        return False


def store(image: Image.Image, data_dir: Path, sha256: str, quality: int) -> tuple[str, bool]:
    """Write the picture once as JPEG under raw/, atomically (temp file + rename). Returns (relpath, written).

    Encoded in memory, then written by Python: PIL writing to a file descriptor ignores a short write (a disk
    filling up mid-file), which left a truncated JPEG under its final name (found by tests/test_faults.py). A file
    already there counts only when it ends with the JPEG end marker.
    """
    rel = raw_relpath(sha256)
    dest = Path(data_dir) / rel
    if dest.is_file() and _complete_jpeg(dest):
        return rel, False
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, optimize=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if str(dest.parent) not in _SWEPT:  # once per folder and process: a killed run's temp files go
        contracts.remove_stale_temps(dest.parent)
        _SWEPT.add(str(dest.parent))
    fd, tmp = contracts.temp_beside(dest, sha256[:12])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rel, True
