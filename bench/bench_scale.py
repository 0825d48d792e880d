"""How cost grows with the number of images: collect, label, train measured at 3 sizes, fitted, extrapolated.

At each size n (SIZES) on this machine, in temp folders, timed in wall seconds and in CPU seconds of the
process (all its threads: core-seconds). The machine is shared, and other work stretches wall time far more
than CPU time, so each size keeps its run with the least CPU time and the lines are fitted on core-seconds.

* **collect**: ``sample://?n=…`` end to end (render, normalise, hash, store, tables), and a folder of the same n
  stored JPEGs (what a user's own photos cost: no rendering). 2 runs per size, sizes interleaved, each into a
  fresh data folder, after one warm-up run.
* **label**: the labeling engine (shards, proposer batches, every crop through 4 experts, weighted fusion,
  Parquet parts, assembly) over all n collected images, in one loop on one torch thread (one of the autolabel
  stage's 2 workers, which get cpu_count // workers threads each), on models already loaded: model loading and
  the one-off training of proposer and experts are left out. The models are bench_autolabel's (the pipeline's
  architectures and sizes, untrained, 8 boxes per image); 2 runs per size, each with an empty label cache.
  Decoding the images alone is timed too (the part a GPU does not take over).
* **train**: an epoch of YOLO11n from yaml at imgsz 256 on n images (the pipeline's training size and its
  ``batch``, ``nbs``, ``cache: ram``; mosaic on), from ultralytics' epoch-start to epoch-end callbacks
  (validation timed apart); best of 2 epochs. ultralytics itself is called (bench_train measures the stage at
  1.02× of it). The data pipeline alone (ultralytics' dataset: load, mosaic, augment) is timed over the same n
  images from the RAM cache and from disk (``cache: false``: 1M decoded images do not fit in RAM).
* **photos**: 8 full-size 12 MP photos (4000×3000, as phones take them), collected, decoded as labeling does and
  read through training's data pipeline: collect keeps a picture's own resolution, so at scale a user's photos
  cost these decodes where the sample world's 256 px scenes cost almost nothing.
* **near-duplicate check**: collect compares each new picture's perceptual hash with every stored one (numpy, in
  its one collecting thread): seconds per image with 10k, 100k and 1M stored, on the real index.

Each stage gets a least-squares line ``core-seconds = a + b·n``; :func:`extrapolate` carries the lines to 1M
images on this CPU and on a GPU pool with a Dask cluster, under the assumptions in ``AT_SCALE`` (stated, not
measured). Writes bench/results/scale.json; ``python -m bench.bench_scale`` also prints docs/scale.md's tables.
About 2.5 minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import row as _row  # noqa: E402  (after the path set-up, for `python bench/bench_scale.py`)

SIZES = (50, 100, 200)
REPS = 2
NEAR_SIZES = (10_000, 100_000, 1_000_000)  # images already in collect's near-duplicate index
NEAR_PROBES = 100
PHOTOS = 8  # full-size photos, for the decode cost of a user's own pictures
PHOTO_SIZE = (4000, 3000)  # 12 MP, a phone camera's
TRAIN_EPOCHS = 2  # the best of them is the figure
IMGSZ = 256
WORLD = "sample://?n={n}&seed=11&catalogue_train=0&catalogue_val=0&generic_train=0&generic_val=0"
RESULTS = ROOT / "bench" / "results" / "scale.json"

# Assumptions for the extrapolation: stated, not measured on this machine. Work is counted in core-seconds (CPU
# seconds of this machine's cores); a GPU is counted as the number of these cores whose work it does.
AT_SCALE = {
    "images": 1_000_000,
    "pipeline_images": 600,  # the default `make run` (sample://?n=600)
    "epochs": 7,  # params.yaml train.epochs
    # cores each stage keeps busy on this 2-core machine: collect's thread pool and labeling's 2 shard threads
    # use both; ultralytics trains on the CPU with cpu_count - 1 torch threads (utils.NUM_THREADS), here 1
    "this_cpu_cores": {"collect": 2, "label": 2, "train": 1},
    "gpus": 8,  # one node of 8 GPUs for training (ultralytics DDP); the same 8 as Dask workers for labeling
    # one T4/A10-class GPU does the batched inference work of 100 of these cores (YOLO11n at 256 px: ~4,000
    # images/s with its crops), and the training work of 50 (~1,000 images/s: a T4 trains YOLO11n on COCO at
    # 640 px near 180 images/s, and 256 px has 6× fewer pixels)
    "gpu_cores_label": 100,
    "gpu_cores_train": 50,
    "cpu_cores_per_gpu": 8,  # data-loader workers (training) or decode threads (labeling) beside each GPU
    "collect_cores": 32,  # collect is one process with a thread pool: one 32-core CPU node
}


def _fit(xs: list[float], ys: list[float]) -> dict:
    import numpy as np

    b, a = np.polyfit(xs, ys, 1)
    pred = a + b * np.asarray(xs)
    ss_res = float(((np.asarray(ys) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(ys) - np.mean(ys)) ** 2).sum())
    return {"a_s": float(a), "b_s_per_image": float(b), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


class _Best:
    """Wall and CPU seconds per size; the best run (least CPU time) of each size is kept."""

    def __init__(self, sizes: tuple[int, ...] = SIZES) -> None:
        self.runs: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}

    def time(self, n: int, fn, *args, **kw):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        self.add(n, time.perf_counter() - w, time.process_time() - c)
        return out

    def add(self, n: int, wall: float, cpu: float) -> None:
        self.runs[n].append((wall, cpu))

    def best(self) -> dict[str, dict[int, float]]:
        pick = {n: min(v, key=lambda wc: wc[1]) for n, v in self.runs.items()}
        return {"wall": {n: w for n, (w, _) in pick.items()}, "cpu": {n: c for n, (_, c) in pick.items()}}


# ---- collect ---------------------------------------------------------------------------------------------------
def _collect(tmp: Path, ontology) -> tuple[_Best, _Best, dict[int, Path]]:
    from tasks import collect
    from wanwu.config import CollectParams, ProjectParams, SourceSpec

    def run(uri: str, data_dir: Path) -> None:
        collect.run(CollectParams(sources=[SourceSpec(uri=uri)]), ProjectParams(data_dir=data_dir), ontology)

    run(WORLD.format(n=5), tmp / "warm")  # imports, fonts, the first glyphs: paid by neither size
    sample, folder = _Best(), _Best()
    dirs: dict[int, Path] = {}
    for rep in range(REPS):
        for n in SIZES:
            d = tmp / f"collect-{n}-{rep}"
            sample.time(n, run, WORLD.format(n=n), d)
            dirs.setdefault(n, d)
    # the same stored JPEGs as a folder of photos
    stored = sorted((dirs[max(SIZES)] / "raw").rglob("*.jpg"))
    for n in SIZES:
        src = tmp / f"photos-{n}"
        src.mkdir()
        for i, p in enumerate(stored[:n]):
            shutil.copyfile(p, src / f"{i:05d}.jpg")
    for rep in range(REPS):
        for n in SIZES:
            folder.time(n, run, str(tmp / f"photos-{n}"), tmp / f"folder-{n}-{rep}")
    return sample, folder, dirs


def _near_index() -> dict[int, float]:
    """Seconds per image of collect's near-duplicate check with NEAR_SIZES images already stored: each new
    perceptual hash is compared with all before it (numpy, in the collector's one thread), so the total grows
    as n²/2. Measured on the real index filled with random hashes."""
    import random

    from tasks.collect import _NearIndex

    rng = random.Random(0)
    out = {}
    for n in NEAR_SIZES:
        index = _NearIndex([f"s{i}" for i in range(n)], [f"{rng.getrandbits(64):016x}" for _ in range(n)])
        probes = [f"{rng.getrandbits(64):016x}" for _ in range(NEAR_PROBES)]
        t = time.process_time()
        for i, h in enumerate(probes):
            index.add(f"p{i}", h, 4)
        out[n] = (time.process_time() - t) / NEAR_PROBES
    return out


# ---- label -----------------------------------------------------------------------------------------------------
def _label(tmp: Path, ontology, dirs: dict[int, Path]) -> tuple[_Best, _Best]:
    from bench.bench_autolabel import BOXES, build_models
    from wanwu import contracts, labeling
    from wanwu.labeling import FusionSpec, LabelerSpec, ProposerSpec

    det, experts = build_models(tmp / "models", ontology)
    engine, decode = _Best(), _Best()
    items: dict[int, list[tuple[str, str]]] = {}
    for n in SIZES:
        manifest = contracts.read("manifest", dirs[n] / "collect" / "manifest.parquet")
        items[n] = list(zip(manifest["sha256"], manifest["path"], strict=True))
        assert len(items[n]) == n, (n, len(items[n]))

    def label(spec: LabelerSpec, its: list[tuple[str, str]], out: Path) -> None:
        labeling.run_shards(spec, its, shard_size=64, map_fn=lambda s, sh: labeling.serial_map(s, sh, progress=False))
        labeling.assemble(spec.version_dir(), [s for s, _ in its], out)

    for rep in range(REPS):
        for n in SIZES:
            decode.time(n, lambda n=n: [labeling.open_image(dirs[n], p) for _, p in items[n]])
            spec = LabelerSpec(
                data_dir=str(dirs[n]),
                ontology=str(ROOT / "ontology.yaml"),
                parts_dir=str(tmp / f"parts-{n}-{rep}"),  # an empty cache: every image is labeled
                proposer=ProposerSpec(weights=str(det), conf=0.0, max_det=BOXES, batch_size=16),
                teachers=[{"kind": "ultralytics", "path": str(p), "name": p.stem, "batch": 256} for p in experts],
                fusion=FusionSpec(strategy="weighted", weights=[1.0] * len(experts)),
                device="cpu",
            )
            models = labeling.load_models(spec)  # loading is not labeling
            labeling.label_images(models, [labeling.open_image(dirs[n], items[n][0][1])])  # warm
            engine.time(n, label, spec, items[n], tmp / f"labels-{n}-{rep}.parquet")
            labeling.forget_models()
    return engine, decode


# ---- train -----------------------------------------------------------------------------------------------------
def _train(tmp: Path) -> tuple[_Best, _Best, _Best, _Best, object]:
    from ultralytics.models.yolo.detect import DetectionTrainer

    from bench.bench_train import _dataset
    from wanwu.config import TrainParams

    args = TrainParams(model="yolo11n.yaml", imgsz=IMGSZ, batch=8, nbs=8, cache="ram", workers=0).ultralytics_args()
    args.update(epochs=TRAIN_EPOCHS, close_mosaic=0, warmup_epochs=0.0, plots=False, verbose=False, val=True)
    epoch, val, loader_ram, loader_disk = _Best(), _Best(), _Best(), _Best()
    for n in SIZES:
        data = _dataset(tmp / f"train-{n}", n_train=n, n_val=16, size=IMGSZ)
        trainer = DetectionTrainer(
            overrides={
                **args,
                "model": "yolo11n.yaml",
                "data": str(data),
                "device": "cpu",
                "project": str(tmp / "runs"),
                "name": f"n{n}",
                "exist_ok": True,
            }
        )
        # the bench measures training, not tracking: ultralytics' MLflow callback (on in the project's settings)
        # would also write into the project's store
        for event, fns in trainer.callbacks.items():
            trainer.callbacks[event] = [f for f in fns if "mlflow" not in getattr(f, "__module__", "")]
        marks: list[tuple[str, float, float]] = []
        for event in ("on_train_epoch_start", "on_train_epoch_end", "on_fit_epoch_end"):
            trainer.add_callback(
                event, lambda _t, e=event, m=marks: m.append((e, time.perf_counter(), time.process_time()))
            )
        trainer.train()
        starts = [(w, c) for e, w, c in marks if e == "on_train_epoch_start"]
        ends = [(w, c) for e, w, c in marks if e == "on_train_epoch_end"]
        fits = [(w, c) for e, w, c in marks if e == "on_fit_epoch_end"]
        for (ws, cs), (we, ce) in zip(starts, ends, strict=True):
            epoch.add(n, we - ws, ce - cs)
            wf, cf = min(f for f in fits if f[0] > we)  # validation and checkpoint save
            val.add(n, wf - we, cf - ce)
        ds = trainer.train_loader.dataset  # RAM-cached, mosaic on: what the timed epochs read
        loader_ram.time(n, lambda ds=ds: [ds[i] for i in range(len(ds))])
        trainer.args.cache = False
        disk = trainer.build_dataset(trainer.data["train"], mode="train", batch=8)
        loader_disk.time(n, lambda ds=disk: [ds[i] for i in range(len(ds))])
    return epoch, val, loader_ram, loader_disk, trainer


# ---- phone photos --------------------------------------------------------------------------------------------
def _photos(tmp: Path, ontology, trainer) -> dict[str, _Best]:
    """Collect, labeling's decode and training's data pipeline on full-size photos (PHOTO_SIZE) instead of the
    sample world's 256 px scenes: collect stores pictures at their own resolution, so later stages decode these."""
    import numpy as np
    from PIL import Image

    from tasks import collect
    from wanwu import labeling
    from wanwu.config import CollectParams, ProjectParams, SourceSpec

    root = tmp / "photos-12mp"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    w, h = PHOTO_SIZE
    for i in range(PHOTOS):
        rng = np.random.default_rng(i)
        base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)  # sensor noise: a photo's JPEG size and entropy
        pixels = np.clip(np.asarray(base, np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"p{i}.jpg", quality=90)
        (root / "labels" / f"p{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    files = sorted((root / "images").glob("*.jpg"))
    out = {k: _Best((PHOTOS,)) for k in ("collect", "decode", "loader")}
    trainer.args.cache = False
    for rep in range(REPS):
        out["collect"].time(
            PHOTOS,
            collect.run,
            CollectParams(sources=[SourceSpec(uri=str(root / "images"))]),
            ProjectParams(data_dir=tmp / f"photos-data-{rep}"),
            ontology,
        )
        out["decode"].time(PHOTOS, lambda: [labeling.open_image(root / "images", f.name) for f in files])
        ds = trainer.build_dataset(str(root / "images"), mode="train", batch=8)
        out["loader"].time(PHOTOS, lambda ds=ds: [ds[i] for i in range(len(ds))])
    return out


# ---- the model on paper ----------------------------------------------------------------------------------------
def extrapolate(fits: dict[str, dict], photo: dict[str, float], near: dict, s: dict = AT_SCALE) -> dict:
    """Hours per stage at the pipeline's size and at 1M images, on this CPU and on the GPU pool (see AT_SCALE).

    ``photo``: core-seconds per full-size photo for collect, labeling's decode and training's data pipeline.
    ``near``: the line of the near-duplicate check's seconds per image against the images already stored; summed
    over 1M images it is ``a·N + b·N²/2``, serial (the collector's one thread) wherever collect runs.
    """
    N, E, G, C = s["images"], s["epochs"], s["gpus"], s["cpu_cores_per_gpu"]
    P = s["this_cpu_cores"]

    def core_s(stage: str, n: int) -> float:
        return fits[stage]["a_s"] + fits[stage]["b_s_per_image"] * n

    b = {k: max(v["b_s_per_image"], 1e-9) for k, v in fits.items()}
    # label: decoding stays on the CPU cores; the rest (proposer, crops, experts, fusion, Parquet) is counted as
    # GPU work, which is optimistic for the crop cutting and the Parquet writing
    label_gpu = s["gpu_cores_label"] / max(b["label"] - b["label_decode"], 1e-9)  # images/s per GPU
    label_cpu = C / b["label_decode"]  # images/s its C cores decode
    # train: an epoch here runs the data pipeline (from the RAM cache) and the model; the GPU takes the model,
    # C loader workers take the data pipeline, from disk (1M decoded images do not fit in RAM)
    train_model_b = max(b["train_epoch"] - b["loader_ram"], 1e-9)
    train_gpu = s["gpu_cores_train"] / train_model_b
    train_cpu = C / b["loader_disk"]
    h = 3600.0
    near_1m = near["a_s"] * N + near["b_s_per_image"] * N * N / 2  # seconds, on one core
    p_n = s["pipeline_images"]
    pipeline = {
        "collect_h": core_s("collect_sample", p_n) / P["collect"] / h,
        "label_h": core_s("label", p_n) / P["label"] / h,
        "train_h": E * core_s("train_epoch", p_n) / P["train"] / h,
    }
    cpu_1m = {
        "collect_h": (core_s("collect_folder", N) / P["collect"] + near_1m) / h,
        "label_h": core_s("label", N) / P["label"] / h,
        "train_h": E * (fits["train_epoch"]["a_s"] + N * (train_model_b + b["loader_disk"])) / P["train"] / h,
    }
    gpu_1m = {
        "collect_h": (b["collect_folder"] * N / s["collect_cores"] + near_1m) / h,
        "label_h": N / (G * min(label_gpu, label_cpu)) / h,
        "train_h": E * N / (G * min(train_gpu, train_cpu)) / h,
    }
    # the same 1M images as full-size photos: only the decoding parts change (the models see imgsz either way)
    label_cpu_photo = C / photo["decode"]
    train_cpu_photo = C / photo["loader"]
    photos_1m = {
        "collect_h": (photo["collect"] * N / s["collect_cores"] + near_1m) / h,
        "label_h": N / (G * min(label_gpu, label_cpu_photo)) / h,
        "train_h": E * N / (G * min(train_gpu, train_cpu_photo)) / h,
    }
    out = {
        "pipeline": {"images": p_n, **pipeline},
        "near_duplicate_check_1m_h": near_1m / h,
        "cpu_1m": {"collect_sample_world_h": (core_s("collect_sample", N) / P["collect"] + near_1m) / h, **cpu_1m},
        "gpu_1m": {
            **gpu_1m,
            "label_per_gpu_img_s": {"gpu": label_gpu, "decode": label_cpu},
            "label_bound": "GPU" if label_gpu < label_cpu else "decoding",
            "train_per_gpu_img_s": {"gpu": train_gpu, "loader": train_cpu},
            "train_bound": "GPU" if train_gpu < train_cpu else "data loader",
            # a loader slower than this per image (core-seconds) makes training loader-bound
            "train_loader_break_even_core_s": C / train_gpu,
        },
        "gpu_1m_photos": {
            **photos_1m,
            "label_per_gpu_img_s": {"gpu": label_gpu, "decode": label_cpu_photo},
            "label_bound": "GPU" if label_gpu < label_cpu_photo else "decoding",
            "train_per_gpu_img_s": {"gpu": train_gpu, "loader": train_cpu_photo},
            "train_bound": "GPU" if train_gpu < train_cpu_photo else "data loader",
        },
    }
    for key, stages in (
        ("pipeline", pipeline),
        ("cpu_1m", cpu_1m),
        ("gpu_1m", gpu_1m),
        ("gpu_1m_photos", photos_1m),
    ):
        ranked = sorted(stages, key=stages.get, reverse=True)
        first, second = ranked[0], ranked[1]
        tie = stages[second] >= 0.9 * stages[first]  # within 10 %: the measurements cannot tell them apart
        out[key]["bottleneck"] = " ≈ ".join(k.removesuffix("_h") for k in ([first, second] if tie else [first]))
    return out


def bench(tmp_dir: str | Path) -> list[dict]:
    from wanwu.ontology import Ontology

    tmp = Path(tmp_dir)
    ontology = Ontology.load(ROOT / "ontology.yaml")
    import torch

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"  # never the project's store
    threads = torch.get_num_threads()  # ultralytics' CPU training lowers it for the whole process: put it back
    t0 = time.perf_counter()
    try:
        sample, folder, dirs = _collect(tmp, ontology)
        sections = {"collect": time.perf_counter() - t0}
        # one torch thread: CPU time is then the work itself (idle OpenMP threads spin, and a busy machine makes
        # them spin longer), and the training below runs on one thread too
        torch.set_num_threads(1)
        label, decode = _label(tmp, ontology, dirs)
        sections["label"] = time.perf_counter() - t0 - sum(sections.values())
        epoch, val, loader_ram, loader_disk, trainer = _train(tmp)
        sections["train"] = time.perf_counter() - t0 - sum(sections.values())
        photos = {k: v.best() for k, v in _photos(tmp, ontology, trainer).items()}
        near = _near_index()
        sections["photos"] = time.perf_counter() - t0 - sum(sections.values())
    finally:
        train_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    stages = {
        "collect_sample": sample,
        "collect_folder": folder,
        "label": label,
        "label_decode": decode,
        "train_epoch": epoch,
        "train_val": val,
        "loader_ram": loader_ram,
        "loader_disk": loader_disk,
    }
    best = {k: v.best() for k, v in stages.items()}
    xs = list(SIZES)
    # fitted on CPU seconds (core-seconds): other work on a shared machine stretches wall time, not CPU time
    fits = {k: _fit(xs, [v["cpu"][n] for n in SIZES]) for k, v in best.items() if k != "train_val"}
    near_fit = {k: round(v, 12) for k, v in _fit(list(NEAR_SIZES), [near[n] for n in NEAR_SIZES]).items()}
    result = {
        "sizes": xs,
        "imgsz": IMGSZ,
        "measured": {
            k: {clock: {str(n): round(t[n], 4) for n in SIZES} for clock, t in v.items()} for k, v in best.items()
        },
        "fits_core_s": {k: {kk: round(vv, 6) for kk, vv in f.items()} for k, f in fits.items()},
        "photos": {
            "count": PHOTOS,
            "size": list(PHOTO_SIZE),
            "per_image": {
                k: {clock: round(t[PHOTOS] / PHOTOS, 5) for clock, t in v.items()} for k, v in photos.items()
            },
        },
        "near_duplicate_check": {
            "core_s_per_image": {str(n): round(v, 7) for n, v in near.items()},
            "fit": near_fit,
        },
        "assumptions": AT_SCALE,
        "extrapolated": extrapolate(fits, {k: v["cpu"][PHOTOS] / PHOTOS for k, v in photos.items()}, near_fit),
        "bench_seconds": round(time.perf_counter() - t0, 1),
        "cpu_count": os.cpu_count(),
        "torch_threads": {"label": 1, "train": train_threads},
        "section_seconds": {k: round(v, 1) for k, v in sections.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    rows = []
    names = {
        "collect_sample": "collect, sample world",
        "collect_folder": "collect, folder of JPEGs",
        "label": "label (engine, models loaded)",
        "train_epoch": f"train, one epoch at imgsz {IMGSZ}",
    }
    small, large = min(SIZES), max(SIZES)
    for key, name in names.items():
        f = fits[key]
        per_large, per_small = best[key]["cpu"][large] / large, best[key]["cpu"][small] / small
        r = _row(
            f"scale: {name}, core-s per image at n={large}",
            per_large,
            "core-s/image",
            f"the same at n={small}",
            per_small,
            per_large / per_small,
            "≤ 1.25 (linear or better; 25 % for a shared machine)",
            per_large / per_small <= 1.25,
        )
        r["fit"] = {k: round(v, 6) for k, v in f.items()}
        rows.append(r)
    return rows


def markdown(result: dict) -> str:
    """The tables of docs/scale.md, from scale.json."""
    m, f, x, s = result["measured"], result["fits_core_s"], result["extrapolated"], result["assumptions"]
    sizes = [str(n) for n in result["sizes"]]
    labels = {
        "collect_sample": "collect, sample world (render + store)",
        "collect_folder": "collect, folder of JPEGs",
        "label": "label: engine, 4 experts, 8 boxes/image",
        "label_decode": "  of which: decoding the images",
        "train_epoch": f"train: one epoch, YOLO11n, imgsz {result['imgsz']}",
        "loader_ram": "  data pipeline alone, RAM cache",
        "loader_disk": "  data pipeline alone, from disk",
        "train_val": "  validation of 16 images + checkpoint, per epoch",
    }
    out = [
        "| stage | "
        + " | ".join(f"n={n}: wall s / core-s" for n in sizes)
        + " | a (core-s) | b (core-ms/image) | R² |",
        "|---|" + "---|" * (len(sizes) + 3),
    ]
    for k, name in labels.items():
        fit = f.get(k)
        tail = f"{fit['a_s']:.2f} | {1000 * fit['b_s_per_image']:.2f} | {fit['r2']:.3f}" if fit else " | | "
        cells = " | ".join(f"{m[k]['wall'][n]:.2f} / {m[k]['cpu'][n]:.2f}" for n in sizes)
        out.append(f"| {name} | {cells} | {tail} |")
    p, c, g, q = x["pipeline"], x["cpu_1m"], x["gpu_1m"], x["gpu_1m_photos"]
    ph = result["photos"]["per_image"]
    out += [
        "",
        f"| {result['photos']['count']} photos of {result['photos']['size'][0]}×{result['photos']['size'][1]} | "
        "wall s / core-s per photo |",
        "|---|---|",
        f"| collect (folder) | {ph['collect']['wall']:.3f} / {ph['collect']['cpu']:.3f} |",
        f"| labeling's decode | {ph['decode']['wall']:.3f} / {ph['decode']['cpu']:.3f} |",
        f"| training's data pipeline, from disk | {ph['loader']['wall']:.3f} / {ph['loader']['cpu']:.3f} |",
    ]
    nd = result["near_duplicate_check"]
    out += [
        "",
        "| collect's near-duplicate check, per new image, with n images stored | "
        + " | ".join(f"n={int(n):,}" for n in nd["core_s_per_image"])
        + " | sum over 1M images (one thread) |",
        "|---|" + "---|" * (len(nd["core_s_per_image"]) + 1),
        "| core-ms | "
        + " | ".join(f"{1000 * v:.3f}" for v in nd["core_s_per_image"].values())
        + f" | {x['near_duplicate_check_1m_h'] * 60:.1f} min |",
    ]

    def hours(v: float) -> str:
        return f"{v * 60:.1f} min" if v < 1 else f"{v:.1f} h"

    def bound(d: dict, stage: str, what: str) -> str:
        r = d[f"{stage}_per_gpu_img_s"]
        cpu = r[next(k for k in r if k != "gpu")]
        return f"{d[f'{stage}_bound']}-bound: GPU {r['gpu']:.0f}/s, {what} {cpu:.0f}/s per GPU"

    near = f"{hours(x['near_duplicate_check_1m_h'])} of it the one-thread near-duplicate check"
    out += [
        "",
        f"| stage | {p['images']} images (the default run), this CPU | 1M images at 256 px, this CPU | "
        f"1M images at 256 px, {s['gpus']} GPUs + Dask | 1M photos at 12 MP, {s['gpus']} GPUs + Dask |",
        "|---|---|---|---|---|",
        f"| collect | {hours(p['collect_h'])} (sample world) | {hours(c['collect_h'])} (folder; sample world "
        f"{hours(c['collect_sample_world_h'])}) | {hours(g['collect_h'])} ({s['collect_cores']} cores; {near}) | "
        f"{hours(q['collect_h'])} ({s['collect_cores']} cores; {near}) |",
        f"| label | {hours(p['label_h'])} | {hours(c['label_h'])} | {hours(g['label_h'])} "
        f"({bound(g, 'label', 'decode')}) | {hours(q['label_h'])} ({bound(q, 'label', 'decode')}) |",
        f"| train, {s['epochs']} epochs | {hours(p['train_h'])} | {hours(c['train_h'])} | {hours(g['train_h'])} "
        f"({bound(g, 'train', 'loaders')}) | {hours(q['train_h'])} ({bound(q, 'train', 'loaders')}) |",
        f"| **bottleneck** | {p['bottleneck']} | {c['bottleneck']} | {g['bottleneck']} | {q['bottleneck']} |",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    import tempfile

    from wanwu.offline import harden

    if "--markdown" not in sys.argv[1:]:  # --markdown: only print the tables of the last run's scale.json
        harden(ROOT)
        with tempfile.TemporaryDirectory(prefix="wanwu-bench-scale-") as d:
            for r in bench(Path(d)):
                print(json.dumps(r, ensure_ascii=False))
        print()
    print(markdown(json.loads(RESULTS.read_text(encoding="utf-8"))))
