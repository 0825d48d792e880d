"""Labeling throughput and re-label cost, each against a baseline measured in the same run on the same models.

1. The labeling engine (shards, one proposer pass per batch of images, every crop of a shard through each
   teacher in batches; shards on 2 threads as the default runner does, and in one loop), in images/s; baseline:
   the straightforward loop autodistill's ComposedDetectionModel runs — the detector's ``predict`` on one image,
   then each classifier's ``predict`` on one crop at a time (ultralytics' own API, crops passed in memory rather
   than through autodistill's temp file) — over the same models, on a subset of the same images. Goal ≥ 5×.
   A stricter baseline is reported too: wanwu's own adapters called one crop at a time (no API overhead).
2. Re-labeling the same images with unchanged models: model calls (goal 0) and seconds as a share of the first
   run (goal ≤ 0.05): every image is found in the content-hash cache.

The models have the default pipeline's architectures and sizes — YOLO11n proposer at 256 px keeping 8 boxes per
image (about what the sample world's scenes hold), four domain experts yolo11n-cls at 32 px, weighted fusion —
built untrained here (speed does not depend on the weights; nothing is downloaded or trained).

Run ``python bench/bench_autolabel.py`` (prints the rows) or call :func:`bench`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import row as _row  # noqa: E402  (after the path set-up, for `python bench/bench_x.py`)

N = 200  # scenes (pool + gold ≈ 90 % of them are labeled)
WORLD = f"sample://?n={N}&seed=5&catalogue_train=0&catalogue_val=0&generic_train=0&generic_val=0"
BASELINE_IMAGES = 30
BOXES = 8


def build_models(out: Path, ontology) -> tuple[Path, list[Path]]:
    """A YOLO11n detector (proposer names) and four yolo11n-cls experts, in ultralytics' checkpoint format."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    from wanwu.models.proposer import OBJECT_NAME

    out.mkdir(parents=True, exist_ok=True)
    y = YOLO("yolo11n.yaml")
    names = {**ontology.names_zh, len(ontology): OBJECT_NAME}
    y.model = DetectionModel("yolo11n.yaml", nc=len(names), verbose=False)
    y.model.names = names
    y.ckpt = {"train_args": {"imgsz": 256, "task": "detect"}}
    det = out / "proposer.pt"
    y.save(det)
    experts = []
    for ids in ontology.by_domain().values():
        c = YOLO("yolo11n-cls.yaml")
        labels = [ontology.en(i).replace(" ", "_") for i in ids] + ["other"]
        c.model = ClassificationModel("yolo11n-cls.yaml", nc=len(labels), verbose=False)
        c.model.names = dict(enumerate(labels))
        c.ckpt = {"train_args": {"imgsz": 32, "task": "classify"}}
        path = out / f"expert_{len(experts)}.pt"
        c.save(path)
        experts.append(path)
    return det, experts


def per_crop_predict_loop(models, det: Path, experts: list[Path], data_dir: Path, items) -> float:
    """Seconds for autodistill's loop over ``items``: ``YOLO.predict`` on the image, then on each crop for each
    classifier, one at a time; the fusion and top-k as the engine does them."""
    import numpy as np
    from ultralytics import YOLO

    from wanwu import labeling
    from wanwu.models.teachers import square_crop, topk_ids

    p = models.proposer
    detector = YOLO(str(det))
    classifiers = [YOLO(str(e)) for e in experts]
    image = labeling.open_image(data_dir, items[0][1])
    detector.predict(image, imgsz=p.imgsz, verbose=False)  # warm both predictors up, out of the timing
    for c in classifiers:
        c.predict(image, imgsz=32, verbose=False)
    t = time.perf_counter()
    for _, path in items:
        image = labeling.open_image(data_dir, path)
        r = detector.predict(
            image, imgsz=p.imgsz, conf=p.conf, iou=p.iou, agnostic_nms=True, max_det=p.max_det, verbose=False
        )[0]
        for box in r.boxes.xyxy.numpy():
            crop = square_crop(image, box, models.crop_context)
            projected = [
                m.project(c.predict(crop, imgsz=32, verbose=False)[0].probs.data.numpy()[None])
                for c, m in zip(classifiers, models.mappings, strict=True)
            ]
            topk_ids(np.asarray(models.fusion(projected)), models.topk)
    return time.perf_counter() - t


def bench(tmp_dir: str | Path) -> list[dict]:
    from tasks import collect
    from wanwu import contracts, labeling
    from wanwu.config import CollectParams, ProjectParams, SourceSpec
    from wanwu.labeling import FusionSpec, LabelerSpec, ProposerSpec
    from wanwu.ontology import Ontology

    tmp = Path(tmp_dir)
    shutil.copy(ROOT / "ontology.yaml", tmp / "ontology.yaml")
    ontology = Ontology.load(tmp / "ontology.yaml")
    project = ProjectParams(data_dir=tmp / "data", ontology=tmp / "ontology.yaml", device="cpu")
    collect.run(CollectParams(sources=[SourceSpec(uri=WORLD)]), project, ontology)
    manifest = contracts.read("manifest", project.data_dir / "collect" / "manifest.parquet")
    manifest = manifest[manifest["split"].isin(["pool", "gold"])]
    items = list(zip(manifest["sha256"], manifest["path"], strict=True))

    det, experts = build_models(tmp / "models", ontology)
    spec = LabelerSpec(
        data_dir=str(project.data_dir),
        ontology=str(project.ontology),
        parts_dir=str(tmp / "parts"),
        proposer=ProposerSpec(weights=str(det), conf=0.0, max_det=BOXES, batch_size=16),
        teachers=[{"kind": "ultralytics", "path": str(p), "name": p.stem, "batch": 256} for p in experts],
        fusion=FusionSpec(strategy="weighted", weights=[1.0] * len(experts)),
        device="cpu",
    )
    models = labeling.load_models(spec)  # loading is not labeling: both sides start with warm models
    images = [labeling.open_image(project.data_dir, p) for _, p in items[:4]]
    labeling.label_images(models, images)
    labeling.label_images_per_crop(models, images[:1])

    # 1. the engine over every image (reading, sharding, Parquet parts included)
    t = time.perf_counter()
    first = labeling.run_shards(
        spec, items, shard_size=64, map_fn=lambda s, sh: labeling.serial_map(s, sh, progress=False)
    )
    labeling.assemble(spec.version_dir(), [s for s, _ in items], tmp / "labels.parquet")
    first_s = time.perf_counter() - t
    engine_rate = len(items) / first_s

    # the same engine with its shards on 2 threads (the default runner's fan-out, without Prefect's start-up)
    from concurrent.futures import ThreadPoolExecutor

    def threads(s, shards):
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda sh: labeling.label_shard(s, sh), shards))

    spec2 = spec.model_copy(update={"parts_dir": str(tmp / "parts-threads")})
    labeling.load_models(spec2)
    t = time.perf_counter()
    labeling.run_shards(spec2, items, shard_size=32, map_fn=threads)
    labeling.assemble(spec2.version_dir(), [s for s, _ in items], tmp / "labels-threads.parquet")
    threads_rate = len(items) / (time.perf_counter() - t)

    # baseline: autodistill's loop through ultralytics' own predict, per image and per crop; images decoded too
    base_items = items[:BASELINE_IMAGES]
    base_rate = len(base_items) / per_crop_predict_loop(models, det, experts, project.data_dir, base_items)
    # stricter baseline: wanwu's adapters one crop at a time
    strict = items[:BASELINE_IMAGES]
    calls0 = models.calls()
    t = time.perf_counter()
    for _, p in strict:
        labeling.label_images_per_crop(models, [labeling.open_image(project.data_dir, p)])
    strict_rate = len(strict) / (time.perf_counter() - t)
    strict_calls = (models.calls() - calls0) / len(strict)
    name = f"autolabel: {len(items)} images × {BOXES} boxes, 4 experts"
    autodistill = "per-crop loop through ultralytics predict (autodistill ComposedDetectionModel), same models"
    rows = [
        _row(
            f"{name}, engine on 2 threads",
            threads_rate,
            "images/s",
            autodistill,
            base_rate,
            threads_rate / base_rate,
            "≥ 5×",
            threads_rate / base_rate >= 5,
        ),
        _row(
            f"{name}, engine in one loop",
            engine_rate,
            "images/s",
            autodistill,
            base_rate,
            engine_rate / base_rate,
            "≥ 5×",
            engine_rate / base_rate >= 5,
        ),
        _row(
            f"{name}, engine in one loop",
            engine_rate,
            "images/s",
            "wanwu's adapters one crop at a time",
            strict_rate,
            engine_rate / strict_rate,
            "(stricter baseline)",
            None,
        ),
        _row(
            "autolabel: model calls per image",
            first.model_calls / len(items),
            "calls/image",
            "adapters one crop at a time",
            strict_calls,
            first.model_calls / len(items) / strict_calls,
            "fewer",
            None,
        ),
    ]

    # 2. re-label with unchanged models
    t = time.perf_counter()
    again = labeling.run_shards(spec, items, shard_size=64)
    labeling.assemble(spec.version_dir(), [s for s, _ in items], tmp / "labels2.parquet")
    again_s = time.perf_counter() - t
    rows.append(
        _row(
            "autolabel: re-label, unchanged models (model calls)",
            again.model_calls,
            "calls",
            "first run",
            first.model_calls,
            None,
            "= 0",
            again.model_calls == 0,
        )
    )
    rows.append(
        _row(
            "autolabel: re-label, unchanged models (time)",
            again_s,
            "s",
            "first run",
            first_s,
            again_s / first_s,
            "≤ 0.05",
            again_s / first_s <= 0.05,
        )
    )
    return rows


if __name__ == "__main__":
    import tempfile

    from wanwu.offline import harden

    harden(ROOT)
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-autolabel-") as d:
        for r in bench(Path(d)):
            print(json.dumps(r, ensure_ascii=False))
