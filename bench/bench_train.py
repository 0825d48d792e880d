"""Overhead of the train stage (MLflow run, resume check, progress, metrics.json) over ultralytics called directly.

Both arms train YOLO11n from yaml with the same arguments on the same small dataset, in the same process,
interleaved (A B B A A B B A, four runs each) so slow drift of a shared machine hits both; ultralytics' own MLflow
callback is on in both (the same settings), each run into its own SQLite store, created before the clock starts.
The figure is the best (minimum) wall time of each arm: on a machine shared with other work, interference only ever
adds time. Both run fp32 in the plain memory layout, as ultralytics trains on any CPU. A third arm C, the stage as
params.yaml runs it (amp bf16 where the CPU has it natively, channels-last where oneDNN makes it the fast layout),
joins them on such a CPU (A B C C B A A B C C B A).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import yaml

EPOCHS = 4
IMGSZ = 160
N_TRAIN = 160


def _params(as_configured: bool = False):
    """The stage's own params (CPU profile defaults, smaller sizes); the direct arm gets the same arguments.

    For the overhead figure ``amp`` and ``channels_last`` are False: ultralytics trains fp32 in the plain layout on
    a CPU whatever they say (its bf16 raises there, its channels-last is CUDA-only), so both arms do the same
    work. ``as_configured``: the stage as the project's params.yaml runs it (amp bf16, channels_last null).
    """
    from wanwu.config import TrainParams

    fast = {"amp": "bf16", "channels_last": None} if as_configured else {"amp": False, "channels_last": False}
    return TrainParams(model="yolo11n.yaml", epochs=EPOCHS, imgsz=IMGSZ, batch=16, seed=0, cache="ram", **fast)


def _dataset(root: Path, n_train: int = N_TRAIN, n_val: int = 32, size: int = IMGSZ) -> Path:
    """Coloured rectangles and ellipses on light backgrounds, 3 classes (ontology ids 0..2, Chinese names)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colours = [(220, 30, 30), (30, 60, 220), (20, 160, 40)]
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.new("RGB", (size, size), tuple(rng.randint(190, 255) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            lines = []
            for _ in range(rng.randint(1, 4)):
                c = rng.randrange(3)
                w, h = rng.randint(14, 48), rng.randint(14, 48)
                x, y = rng.randint(0, size - w), rng.randint(0, size - h)
                (draw.rectangle if c != 1 else draw.ellipse)((x, y, x + w, y + h), fill=colours[c])
                lines.append(f"{c} {(x + w / 2) / size:.5f} {(y + h / 2) / size:.5f} {w / size:.5f} {h / size:.5f}")
            img.save(root / "images" / split / f"{split}{i:04d}.jpg", quality=95)
            (root / "labels" / split / f"{split}{i:04d}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "test": "images/test"}
    data["names"] = {0: "猫", 1: "狗", 2: "鸟"}
    (root / "data.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return root / "data.yaml"


def _use_store(store: Path) -> None:
    """Point MLflow at ``store`` and create its tables now, untimed: a project's store exists before its runs
    (creating one runs MLflow's schema migrations, several seconds, once per store)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    MlflowClient().search_experiments()


def _direct(data: Path, out: Path, store: Path, every_core: bool = True, **change: int) -> float:
    """ultralytics alone. ``every_core``: the stage's torch thread count (wanwu.training.cpu_threads), so the
    ratio is the stage's own overhead; False: ultralytics' default (cpu_count - 1 threads)."""
    import mlflow
    from ultralytics import YOLO

    from wanwu.training import cpu_threads, threads_callbacks

    _use_store(store)
    args = {**_params().ultralytics_args(), **change}
    model = YOLO("yolo11n.yaml")
    if every_core:
        for event, fn in threads_callbacks(cpu_threads()).items():
            model.add_callback(event, fn)
    t = time.perf_counter()
    model.train(
        data=str(data), project=str(out), name="run", exist_ok=True, device="cpu", plots=False, verbose=False, **args
    )
    seconds = time.perf_counter() - t
    if mlflow.active_run() is not None:  # ultralytics keeps its run open under MLFLOW_KEEP_RUN_ACTIVE
        mlflow.end_run()
    return seconds


def _stage(data_dir: Path, store: Path, as_configured: bool = False) -> float:
    from tasks.train import run
    from wanwu.config import ProjectParams

    _use_store(store)
    params = _params(as_configured)
    t = time.perf_counter()
    run(params, ProjectParams(data_dir=data_dir, seed=0, device="cpu"))
    return time.perf_counter() - t


def bench(tmp_dir: Path) -> list[dict]:
    import shutil

    from wanwu.training import cpu_channels_last_helps, cpu_has_native_bf16, enable_ultralytics_mlflow

    tmp_dir = Path(tmp_dir)
    data_dir = tmp_dir / "data"
    data = _dataset(data_dir / "quality" / "dataset")
    enable_ultralytics_mlflow(True)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "WANWU_ARTIFACT_ROOT", "WANWU_PARENT_RUN_ID")}
    os.environ["WANWU_ARTIFACT_ROOT"] = (tmp_dir / "mlartifacts").as_uri()
    os.environ.pop("WANWU_PARENT_RUN_ID", None)
    direct: list[float] = []
    stage: list[float] = []
    fast: list[float] = []
    native_bf16, channels_last = cpu_has_native_bf16(), cpu_channels_last_helps()
    default_threads = 0.0
    try:
        # imports, the first model build, caches: paid here, by neither arm
        _direct(data, tmp_dir / "warmup", tmp_dir / "warmup.db", epochs=1)
        # A: ultralytics direct, B: the stage (both fp32, plain layout), C: the stage as params.yaml runs it
        for i, arm in enumerate("ABCCBAABCCBA" if native_bf16 or channels_last else "ABBAABBA"):
            if arm == "A":
                direct.append(_direct(data, tmp_dir / f"direct{i}", tmp_dir / f"direct{i}.db"))
            else:
                shutil.rmtree(data_dir / "train", ignore_errors=True)
                (fast if arm == "C" else stage).append(_stage(data_dir, tmp_dir / f"stage{i}.db", arm == "C"))
        default_threads = _direct(data, tmp_dir / "direct_default", tmp_dir / "direct_default.db", every_core=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    d, s = min(direct), min(stage)
    ratio = s / d
    rows = [
        {
            "name": f"train stage vs ultralytics direct (YOLO11n, {N_TRAIN} imgs, {EPOCHS} epochs, imgsz {IMGSZ})",
            "value": round(s, 2),
            "unit": "s",
            "baseline": "YOLO(...).train, same args",
            "baseline_value": round(d, 2),
            "ratio": round(ratio, 3),
            "goal": "≤ 1.05",
            "met": ratio <= 1.05,
            "overhead_s": round(s - d, 2),
            "runs": {"direct": [round(x, 2) for x in direct], "stage": [round(x, 2) for x in stage]},
        },
        {
            "name": f"train stage on every core vs ultralytics' default threads (cpu_count - 1 = {_ul_threads()})",
            "value": round(s, 2),
            "unit": "s",
            "baseline": "YOLO(...).train, same args, its own thread count",
            "baseline_value": round(default_threads, 2),
            "ratio": round(s / default_threads, 3),
            "goal": "< 1 on a machine with 2+ cores",
            "met": s < default_threads,
        },
    ]
    if fast:
        b = min(fast)
        how = " and ".join(what for what, on in (("amp bf16", native_bf16), ("channels-last", channels_last)) if on)
        rows.append(
            {
                "name": f"train stage as params.yaml runs it on this CPU ({how}) vs ultralytics direct (fp32, plain "
                "layout: all ultralytics trains in on a CPU)",
                "value": round(b, 2),
                "unit": "s",
                "baseline": "YOLO(...).train, same args but amp and channels_last",
                "baseline_value": round(d, 2),
                "ratio": round(b / d, 3),
                "goal": "< 1 on a CPU with native bf16 or oneDNN",
                "met": b < d,
                "runs": {"direct": [round(x, 2) for x in direct], "stage_as_configured": [round(x, 2) for x in fast]},
            }
        )
    else:
        print("train bench: neither native bf16 nor a channels-last CPU here: the as-configured row is not run")
    return rows


def _ul_threads() -> int:
    from ultralytics.utils import NUM_THREADS

    return NUM_THREADS
