"""ONNX export that counts only when it reloads and agrees with PyTorch; INT8 only where it pays on this machine.

- :func:`export_onnx`: ultralytics' exporter with the params' ``imgsz``, ``dynamic``, ``simplify``, ``opset``.
- :func:`parity`: the ONNX file is loaded in onnxruntime and run on real images next to the PyTorch model, on the
  same letterboxed tensors. Two figures: the largest raw-output difference (box pixels and class scores) and
  box-level agreement after confidence filtering and NMS (the served model's own post-processing,
  :func:`wanwu.pyfunc.postprocess`, on both outputs). Below the thresholds the export is refused.
- :func:`quantize_int8`: onnxruntime static quantization (QDQ) calibrated on training images. The detection
  head's decode stays float: it mixes box pixels (0..imgsz) and class probabilities (0..1), which one INT8 scale
  would crush; everything before it is quantized (see :func:`int8_exclusions`).
- :func:`int8_decision`: INT8 is kept only when it is faster here (p50, batch 1, same session options) and loses
  at most ``int8_max_map_drop`` mAP50-95 on the gold set; the figures are recorded either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wanwu.evaluation import MAP, MAP50
from wanwu.pyfunc import box_iou, letterbox, postprocess


class ExportError(RuntimeError):
    """The export failed or does not agree with PyTorch; the message gives the figure, the threshold and the fix."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(
    weights: str | Path,
    out_dir: str | Path,
    imgsz: int,
    dynamic: bool = True,
    simplify: bool = True,
    opset: int | None = None,
) -> tuple[Path, Path]:
    """Export ``weights`` to ``out_dir/model.onnx``; return (onnx, the weights copy beside it).

    The checkpoint is copied first because ultralytics writes the ONNX file next to its input, and the input
    belongs to another stage's folder.
    """
    from ultralytics import YOLO

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / "model.pt"
    if Path(weights).resolve() != pt.resolve():
        shutil.copyfile(weights, pt)
    args: dict[str, Any] = {
        "format": "onnx",
        "imgsz": imgsz,
        "dynamic": dynamic,
        "simplify": simplify,
        "device": "cpu",
        "batch": 1,
        "verbose": False,
    }
    if opset:
        args["opset"] = opset
    try:
        f = YOLO(str(pt)).export(**args)
    except Exception as e:  # ultralytics wraps every failure the same way; say which knob to turn
        raise ExportError(f"{pt}: ONNX export failed ({e}). Try another export.opset or export.simplify=false.") from e
    onnx_path = Path(f)
    if not onnx_path.is_file():
        raise ExportError(f"{pt}: ultralytics reported {f} but no file is there.")
    return onnx_path, pt


def torch_model(weights: str | Path) -> Any:
    """The fused PyTorch detection model in eval mode on the CPU (what the exporter traced)."""
    from ultralytics import YOLO

    model = YOLO(str(weights)).model.float().cpu().eval()
    return model.fuse() if hasattr(model, "fuse") else model


def torch_raw(model: Any, tensor: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model(torch.from_numpy(tensor))
    out = out[0] if isinstance(out, (list, tuple)) else out
    if isinstance(out, dict):  # end-to-end heads return a dict; the one2many branch is what ONNX carries
        out = out.get("one2many", next(iter(out.values())))
        out = out[0] if isinstance(out, (list, tuple)) else out
    return out.detach().cpu().numpy()


def onnx_session(onnx_path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def box_agreement(a: np.ndarray, b: np.ndarray, min_iou: float) -> tuple[int, int]:
    """(matched, total): boxes of the same class matched one-to-one at IoU ≥ min_iou; total = max(len a, len b)."""
    total = max(len(a), len(b))
    if total == 0 or len(a) == 0 or len(b) == 0:
        return 0, total
    ious = box_iou(a[:, :4], b[:, :4])
    ious[a[:, 5][:, None] != b[:, 5][None, :]] = 0.0
    matched = 0
    used: set[int] = set()
    for i in np.argsort(-a[:, 4]):
        order = [j for j in np.argsort(-ious[i]) if j not in used]
        if order and ious[i, order[0]] >= min_iou:
            used.add(int(order[0]))
            matched += 1
    return matched, total


def parity(
    weights: str | Path,
    onnx_path: str | Path,
    images: Sequence[str | Path],
    imgsz: int,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    box_iou_min: float = 0.9,
    max_abs_diff: float = 0.01,
    min_agreement: float = 0.95,
) -> dict[str, Any]:
    """Run PyTorch and onnxruntime on the same letterboxed images; return the figures and whether they pass."""
    model = torch_model(weights)
    session = onnx_session(onnx_path)
    input_name = session.get_inputs()[0].name
    worst, worst_score, matched, total, n_torch, n_onnx = 0.0, 0.0, 0, 0, 0, 0
    for image in images:
        tensor, _, _ = letterbox(image, imgsz)
        ref = torch_raw(model, tensor)
        got = session.run(None, {input_name: tensor})[0]
        if ref.shape != got.shape:
            raise ExportError(
                f"{onnx_path}: output shape {got.shape} differs from PyTorch's {ref.shape}. Re-export with the "
                "same imgsz and check export.dynamic."
            )
        diff = np.abs(ref - got)
        worst = max(worst, float(diff.max()))
        worst_score = max(worst_score, float(diff[:, 4:].max()) if diff.shape[1] > 4 else 0.0)
        a, b = postprocess(ref[0], conf, iou), postprocess(got[0], conf, iou)
        m, t = box_agreement(a, b, box_iou_min)
        matched, total, n_torch, n_onnx = matched + m, total + t, n_torch + len(a), n_onnx + len(b)
    agreement = 1.0 if total == 0 else matched / total
    report = {
        "images": len(images),
        "imgsz": imgsz,
        "max_abs_diff": worst,
        "max_abs_diff_scores": worst_score,
        "max_abs_diff_threshold": max_abs_diff,
        "boxes_torch": n_torch,
        "boxes_onnx": n_onnx,
        "boxes_matched": matched,
        "box_agreement": agreement,
        "box_agreement_threshold": min_agreement,
        "box_iou_min": box_iou_min,
        "conf": conf,
        "iou": iou,
    }
    report["passed"] = bool(worst <= max_abs_diff and agreement >= min_agreement)
    return report


def check_parity(report: dict[str, Any], onnx_path: str | Path) -> None:
    """Raise ExportError with the figures when the parity report failed."""
    if report["passed"]:
        return
    raise ExportError(
        f"{onnx_path}: ONNX does not match PyTorch: max raw difference {report['max_abs_diff']:.4g} "
        f"(threshold {report['max_abs_diff_threshold']}), box agreement {report['box_agreement']:.3f} "
        f"(threshold {report['box_agreement_threshold']}). Try another export.opset or export.simplify=false; "
        "loosen export.parity_* only if the difference is understood."
    )


# ---- INT8 ------------------------------------------------------------------------------------------------


def _calibration_reader(images: Sequence[str | Path], imgsz: int, input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Letterboxed training images, one per batch, the same pre-processing as the served model."""

        def __init__(self) -> None:
            self._it = self._batches()

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for image in images:
                yield {input_name: letterbox(image, imgsz)[0]}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._batches()

    return Reader()


def int8_exclusions(model: Any) -> list[str]:
    """Nodes left in float: the detection head's decode (every non-Conv node of the last ``/model.N/`` layer) and
    attention Softmax. The rest of the graph is quantized, activations included, so tensors stay INT8 from conv
    to conv; quantizing only the convs (ultralytics' recipe) leaves a Q/DQ pair around every SiLU and measured
    no faster than FP32 here. Graphs without ultralytics' node names fall back to that conv-only recipe."""
    import re

    layers = [int(m.group(1)) for n in model.graph.node if (m := re.search(r"/model\.(\d+)/", n.name))]
    if not layers:
        return [n.name for n in model.graph.node if n.op_type not in {"Conv", "Gemm", "MatMul"}]
    head = f"/model.{max(layers)}/"
    return [n.name for n in model.graph.node if (head in n.name and n.op_type != "Conv") or n.op_type == "Softmax"]


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[str | Path],
    imgsz: int,
    per_channel: bool = False,
) -> Path:
    """Static INT8 (QDQ) quantization of the weighted ops, calibrated on ``calibration`` images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ExportError("INT8 needs calibration images: the train split is empty. Set export.int8=false.")
    model = onnx.load(str(onnx_path))
    exclude = int8_exclusions(model)
    out_path = Path(out_path)
    advice = _DropPreprocessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(
            str(onnx_path),
            str(out_path),
            _calibration_reader(calibration, imgsz, model.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
        )
    finally:
        logging.getLogger().removeFilter(advice)
    # keep ultralytics' metadata (names, stride, imgsz) so the INT8 file validates and predicts like the FP32 one
    q = onnx.load(str(out_path))
    del q.metadata_props[:]
    for p in model.metadata_props:
        q.metadata_props.add(key=p.key, value=p.value)
    onnx.save(q, str(out_path))
    return out_path


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime advises shape-inference pre-processing on every call; Conv-only QDQ does not need it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def interleaved_latency(
    runners: dict[str, Any], runs: int = 50, warmup: int = 5, rounds: int = 5
) -> dict[str, tuple[float, float]]:
    """p50 and p95 in ms of each callable, timed in alternating rounds (``runs`` calls each in all), so that the
    load of a shared machine weighs on every contender alike: the INT8 decision compares like with like."""
    import statistics
    import time

    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[name].append(1000.0 * (time.perf_counter() - t0))
    out = {}
    for name, ms in samples.items():
        ms.sort()
        out[name] = (statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))])
    return out


def onnx_runner(onnx_path: str | Path, image: str | Path, imgsz: int, threads: int | None = None) -> Any:
    """A callable running one forward pass of the ONNX file on one letterboxed image (batch 1)."""
    session = onnx_session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: letterbox(image, imgsz)[0]}
    return lambda: session.run(None, feed)


def onnx_latency(
    onnx_path: str | Path, image: str | Path, imgsz: int, runs: int = 50, warmup: int = 5
) -> tuple[float, float]:
    """onnxruntime CPU latency of one forward pass, batch 1: p50, p95 in ms."""
    return interleaved_latency({"onnx": onnx_runner(onnx_path, image, imgsz)}, runs, warmup, rounds=1)["onnx"]


def onnx_map(onnx_path: str | Path, data_yaml: str | Path, imgsz: int, split: str = "test", batch: int = 16) -> dict:
    """mAP of an ONNX file on a split, through ultralytics' validator (the same one the .pt figures come from)."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="wanwu-val-") as scratch:  # ultralytics' save folder, not ./runs
        m = YOLO(str(onnx_path), task="detect").val(
            data=str(data_yaml),
            split=split,
            imgsz=imgsz,
            batch=batch,
            device="cpu",
            verbose=False,
            plots=False,
            workers=0,
            project=scratch,
            name="val",
            exist_ok=True,
        )
    return {MAP50: round(float(m.box.map50), 5), MAP: round(float(m.box.map), 5)}


def int8_decision(
    fp32: dict[str, float], int8: dict[str, float], *, max_map_drop: float, min_speedup: float
) -> dict[str, Any]:
    """Keep INT8 only when it is faster by ``min_speedup``× (p50) and loses ≤ ``max_map_drop`` mAP50-95."""
    speedup = fp32["latency_ms_p50"] / max(int8["latency_ms_p50"], 1e-9)
    drop = fp32[MAP] - int8[MAP]
    reasons = []
    if speedup < min_speedup:
        reasons.append(f"not faster enough: {speedup:.2f}× < {min_speedup}×")
    if drop > max_map_drop:
        reasons.append(f"mAP50-95 drops {drop * 100:.2f} points > {max_map_drop * 100:.2f}")
    return {
        "kept": not reasons,
        "speedup_p50": round(speedup, 3),
        "map50_95_drop": round(drop, 5),
        "max_map_drop": max_map_drop,
        "min_speedup": min_speedup,
        "reason": "; ".join(reasons) or f"{speedup:.2f}× faster, mAP50-95 change {-drop * 100:+.2f} points",
        "fp32": fp32,
        "int8": int8,
    }


def labels_for(weights: str | Path, imgsz: int, ontology_path: str | Path | None) -> dict[str, Any]:
    """The labels.json the served model reads: imgsz and id → Chinese / English names.

    Chinese names come from the checkpoint (the quality stage wrote ontology names into data.yaml); English names
    from the ontology by id. A name the ontology does not know keeps its checkpoint name in both languages.
    """
    from ultralytics import YOLO

    names = {int(k): str(v) for k, v in YOLO(str(weights)).names.items()}
    names_en = dict(names)
    if ontology_path is not None and Path(ontology_path).is_file():
        from wanwu.ontology import Ontology

        onto = Ontology.load(ontology_path)
        for i, zh in names.items():
            try:
                cid = onto.lookup(zh)
            except KeyError:
                continue
            names_en[i] = onto.en(cid)
    return {
        "imgsz": int(imgsz),
        "names_zh": {str(k): v for k, v in names.items()},
        "names_en": {str(k): v for k, v in names_en.items()},
    }


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path
