"""A small synthetic world for the quality stage's tests and bench: the collect and autolabel tables, fast.

Each picture is smooth random noise (so perceptual hashes differ) with coloured rectangles where its objects are.
The truth is known; the human labels of seed and gold images are the truth's ontology boxes; the auto labels of
pool and gold images are the truth with the faults a real proposer + teacher has: jittered boxes, wrong classes,
misses, false positives, duplicates, soft top-k probabilities and review flags. Written through the contracts,
exactly where the collect and autolabel stages write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from wanwu import contracts
from wanwu.images import phash_hex, pixel_sha256, raw_relpath

COLOURS = [(220, 30, 30), (30, 60, 220), (20, 160, 40), (230, 180, 20), (150, 40, 170), (20, 170, 170)]


@dataclass
class World:
    data_dir: Path
    manifest: pd.DataFrame
    human: pd.DataFrame
    auto: pd.DataFrame
    truth: pd.DataFrame


def _label_row(sha: str, box_id: int, box, label: int, origin: str, **kw) -> dict:
    row = {
        "sha256": sha,
        "box_id": box_id,
        "x1": float(box[0]),
        "y1": float(box[1]),
        "x2": float(box[2]),
        "y2": float(box[3]),
        "proposer": origin if origin != "auto" else "proposer-test",
        "proposer_conf": None,
        "topk_ids": [label],
        "topk_probs": [1.0],
        "label_id": label,
        "confidence": 1.0,
        "origin": origin,
        "needs_review": False,
        "source_label": None,
    }
    row.update(kw)
    return row


def render(rng: np.random.Generator, size: int, boxes: list[tuple], brightness: float) -> Image.Image:
    """Smooth noise around ``brightness`` with a filled rectangle per object."""
    small = rng.integers(0, 256, (6, 6, 3)).astype(np.float32)
    base = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
    base = np.clip(base - base.mean() + brightness, 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    for x1, y1, x2, y2, label in boxes:
        d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[label % len(COLOURS)] if label >= 0 else (128, 128, 128))
    return img


def make_world(
    data_dir: Path,
    n: int = 40,
    *,
    classes: tuple[int, ...] = (0, 1, 2),
    gold_share: float = 0.2,
    seed_share: float = 0.2,
    seed: int = 0,
    size: int = 96,
    brightness: tuple[float, float] = (70.0, 190.0),
    auto: bool = True,
    truth: bool = True,
    write: bool = True,
    start: int = 0,
) -> World:
    """``n`` scenes; roles by index (gold first, then seed, then pool). ``start`` offsets the scene ids so a
    second call adds new, different images to the same world."""
    rng = np.random.default_rng(seed * 100_003 + start)
    data_dir = Path(data_dir)
    man_rows, human_rows, auto_rows, truth_rows = [], [], [], []
    k = len(classes)
    now = datetime.now(UTC)
    for i in range(n):
        role = "gold" if i < gold_share * n else ("seed" if i < (gold_share + seed_share) * n else "pool")
        objs = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.integers(size // 6, size // 2, 2)
            x1, y1 = rng.integers(0, size - w), rng.integers(0, size - h)
            label = int(classes[int(rng.integers(0, k))]) if rng.random() > 0.15 else -1
            objs.append((int(x1), int(y1), int(x1 + w), int(y1 + h), label))
        img = render(rng, size, objs, float(rng.uniform(*brightness)))
        sha = pixel_sha256(img)
        rel = raw_relpath(sha)
        if write:
            dest = data_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            img.save(dest, "JPEG", quality=90)
        man_rows.append(
            {
                "sha256": sha,
                "path": rel,
                "source": f"test://world#{start + i}",
                "width": size,
                "height": size,
                "format": "RENDERED",
                "bytes": 0,
                "ingested_at": now,
                "split": role,
                "phash": phash_hex(img),
            }
        )
        for j, (x1, y1, x2, y2, label) in enumerate(objs):
            truth_rows.append(_label_row(sha, j, (x1, y1, x2, y2), label, "truth", proposer="truth"))
        if role in ("seed", "gold"):
            kept = [o for o in objs if o[4] >= 0]
            for j, (x1, y1, x2, y2, label) in enumerate(kept):
                human_rows.append(_label_row(sha, j, (x1, y1, x2, y2), label, "human", proposer="human"))
        if role in ("pool", "gold") and auto:
            bid = 0
            for x1, y1, x2, y2, label in objs:
                if rng.random() < 0.08:  # missed
                    continue
                jit = rng.normal(0, 1.5, 4)
                box = np.clip(np.array([x1, y1, x2, y2], float) + jit, 0, size)
                guess = label if rng.random() > 0.1 else int(classes[int(rng.integers(0, k))])
                p1 = float(rng.uniform(0.45, 0.97))
                others = [c for c in [*classes, -1] if c != guess][:2]
                rest = (1 - p1) * np.array([0.6, 0.3])[: len(others)]
                row = _label_row(
                    sha,
                    bid,
                    box,
                    guess,
                    "auto",
                    proposer_conf=float(rng.uniform(0.3, 0.99)),
                    topk_ids=[guess, *others],
                    topk_probs=[p1, *rest.tolist()],
                    confidence=p1,
                    needs_review=p1 < 0.55,
                )
                auto_rows.append(row)
                bid += 1
                if rng.random() < 0.1:  # a duplicate proposal of the same object
                    auto_rows.append({**row, "box_id": bid, "x1": row["x1"] + 1, "confidence": p1 * 0.9})
                    bid += 1
            if rng.random() < 0.1:  # a false positive
                auto_rows.append(
                    _label_row(
                        sha,
                        bid,
                        (2, 2, size // 4, size // 4),
                        int(classes[0]),
                        "auto",
                        proposer_conf=0.3,
                        topk_ids=[int(classes[0])],
                        topk_probs=[0.6],
                        confidence=0.6,
                    )
                )
    world = World(
        data_dir,
        pd.DataFrame(man_rows),
        pd.DataFrame(human_rows, columns=contracts.SCHEMAS["labels"].names),
        pd.DataFrame(auto_rows, columns=contracts.SCHEMAS["labels"].names),
        pd.DataFrame(truth_rows, columns=contracts.SCHEMAS["labels"].names),
    )
    if write:
        save(world, auto=auto, truth=truth)
    return world


def save(world: World, *, auto: bool = True, truth: bool = True) -> None:
    """Write the tables where collect and autolabel write them (through the contracts)."""
    d = world.data_dir
    contracts.write("manifest", world.manifest, d / "collect" / "manifest.parquet")
    contracts.write("labels", world.human, d / "collect" / "human_labels.parquet")
    if truth:
        contracts.write("labels", world.truth, d / "collect" / "truth.parquet")
    if auto:
        contracts.write("labels", world.auto, d / "autolabel" / "labels.parquet")


def merge(a: World, b: World) -> World:
    """Two worlds in one data folder (``b`` written after ``a``): the tables concatenated."""
    return World(
        a.data_dir,
        pd.concat([a.manifest, b.manifest], ignore_index=True),
        pd.concat([a.human, b.human], ignore_index=True),
        pd.concat([a.auto, b.auto], ignore_index=True),
        pd.concat([a.truth, b.truth], ignore_index=True),
    )
