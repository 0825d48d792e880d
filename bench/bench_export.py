"""Export payoff, each figure against a baseline measured in the same run.

1. onnxruntime p50 of one forward pass (YOLO11n, batch 1, the size the pipeline exports at: 288 by default) against
   PyTorch CPU p50 of the same fused model on the same letterboxed tensor. Goal: ≤ 0.6×.
2. INT8 (onnxruntime static QDQ, the export stage's recipe) p50 against FP32 onnxruntime p50, same model and
   input. The export stage keeps INT8 only when this ratio is below 1 / ``export.int8_min_speedup``.
3. The mAP50-95 change INT8 brings on a gold set, in points (1 point = 0.01), against the FP32 ONNX figure.
   Goal: ≥ −1 point (the stage's ``export.int8_max_map_drop``).

The model, gold set and size are the pipeline's (``data/train/best.pt``, the quality dataset's test split, the size
the evaluate stage recorded and the export stage exports at) when a run has produced them. Otherwise (1) and (2) use
YOLO11n built from its yaml (latency does not depend on the weights) and (3) the shapes world of the tests, trained
here for 36 epochs at imgsz 64 (about 30 s alone on two cores) and measured on 160 fresh gold images of that world:
a small but real model, so the mAP change is a measured one.

Latencies are one forward pass, batch 1, on the same letterboxed tensor, timed in ten alternating rounds of the
three models (after a warm-up each), so the load of a shared machine weighs on all of them alike; p50 over all
rounds. Each pair is measured twice: one intra-op thread each (robust when other processes compete for the
cores) and all cores each (what a dedicated server sees). Run ``python -m bench export``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import row as _row  # noqa: E402  (after the path set-up, for `python bench/bench_x.py`)

RUNS, WARMUP, ROUNDS = 200, 10, 10  # timed calls per model, in alternating rounds


def _runners(pt: Path, onnx_path: Path, int8_path: Path, image: Path, imgsz: int, threads: int) -> dict:
    """One forward pass each, on the same letterboxed tensor: PyTorch (fused), onnxruntime FP32 and INT8, with
    ``threads`` intra-op threads each."""
    import torch

    from wanwu import export as ex
    from wanwu.pyfunc import letterbox

    torch.set_num_threads(threads)
    model, x = ex.torch_model(pt), torch.from_numpy(letterbox(image, imgsz)[0])

    def run_torch() -> None:
        with torch.inference_mode():
            model(x)

    return {
        "torch": run_torch,
        "fp32": ex.onnx_runner(onnx_path, image, imgsz, threads),
        "int8": ex.onnx_runner(int8_path, image, imgsz, threads),
    }


def _pipeline() -> tuple[Path, Path, int] | None:
    """The pipeline's student, dataset and the size the export stage exports at (the evaluated size, which the
    evaluate stage records), when a run got that far."""
    weights = ROOT / "data" / "train" / "best.pt"
    data = ROOT / "data" / "quality" / "dataset" / "data.yaml"
    evaluation = ROOT / "data" / "evaluate" / "metrics.json"
    if not (weights.is_file() and data.is_file() and evaluation.is_file()):
        return None
    from wanwu.config import load_params

    exported = load_params(ROOT / "params.yaml").export.imgsz  # an explicit export size wins, as in the stage
    return weights, data, exported or int(json.loads(evaluation.read_text(encoding="utf-8"))["gold"]["imgsz"])


def bench(tmp_dir: Path) -> list[dict]:
    from wanwu import export as ex
    from wanwu.evaluation import MAP, split_images
    from wanwu.offline import harden

    harden(ROOT)
    tmp_dir = Path(tmp_dir)
    found = _pipeline()
    if found is not None:
        weights, data, imgsz = found
        source = f"pipeline model {weights.relative_to(ROOT)}"
        images = split_images(data, "test")
        calib = split_images(data, "train")[:64]
    else:
        from ultralytics import YOLO

        from tests._shapes import make_dataset

        imgsz = 256
        weights = tmp_dir / "yolo11n.pt"
        YOLO("yolo11n.yaml").save(str(weights))
        world = make_dataset(tmp_dir / "world", n_train=32, n_val=0, n_test=4, size=imgsz)
        images, calib = split_images(world, "test"), split_images(world, "train")
        source = "YOLO11n from yolo11n.yaml"
    onnx_path, pt = ex.export_onnx(weights, tmp_dir / "latency", imgsz, dynamic=True, simplify=True, opset=18)
    q = ex.quantize_int8(onnx_path, tmp_dir / "latency" / "model.int8.onnx", calib, imgsz)
    import os

    import torch

    default_threads = len(os.sched_getaffinity(0))  # all cores (torch's own setting may have been lowered)
    rows = []
    for threads in (1, default_threads):
        lat = ex.interleaved_latency(_runners(pt, onnx_path, q, images[0], imgsz, threads), RUNS, WARMUP, ROUNDS)
        torch_p50, ort_p50, int8_p50 = lat["torch"][0], lat["fp32"][0], lat["int8"][0]
        how = "1 thread each" if threads == 1 else f"{threads} threads each (all cores)"
        rows += [
            _row(
                f"export: onnxruntime p50, {source}, imgsz {imgsz}, batch 1, {how}",
                ort_p50,
                "ms",
                "PyTorch CPU p50, same model, input and threads",
                torch_p50,
                ort_p50 / torch_p50,
                "≤ 0.6×",
                ort_p50 / torch_p50 <= 0.6,
            ),
            _row(
                f"export: INT8 onnxruntime p50, imgsz {imgsz}, {how}",
                int8_p50,
                "ms",
                "FP32 onnxruntime p50",
                ort_p50,
                int8_p50 / ort_p50,
                "< 1 (INT8 kept only when faster)",
                int8_p50 < ort_p50,
            ),
        ]
    torch.set_num_threads(default_threads)

    # the accuracy INT8 costs, on a gold set
    if found is not None:
        data, acc_onnx, acc_q, acc_size, what = found[1], onnx_path, q, imgsz, "pipeline gold set"
    else:
        from tests._shapes import make_dataset, trained_checkpoints

        ck = trained_checkpoints(tmp_dir / "shapes-run")
        # a larger gold set than the tests' (16 images): a one-point mAP change must not be noise
        data = make_dataset(tmp_dir / "gold", n_train=64, n_val=0, n_test=160, seed=7)
        acc_size, what = 64, "shapes world (trained here), 160 gold images, imgsz 64"
        acc_onnx, _ = ex.export_onnx(ck["best"], tmp_dir / "accuracy", acc_size, dynamic=True, simplify=True, opset=18)
        acc_q = ex.quantize_int8(
            acc_onnx, tmp_dir / "accuracy" / "model.int8.onnx", split_images(data, "train")[:64], acc_size
        )
    fp32 = ex.onnx_map(acc_onnx, data, acc_size)
    int8 = ex.onnx_map(acc_q, data, acc_size)
    change = (int8[MAP] - fp32[MAP]) * 100
    rows.append(
        _row(
            f"export: INT8 mAP50-95 change, {what}",
            change,
            "points",
            "FP32 ONNX mAP50-95",
            fp32[MAP],
            None,
            "≥ −1 point",
            change >= -1.0,
        )
    )
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for r in bench(Path(d)):
            print(r)
