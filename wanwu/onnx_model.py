"""An ultralytics-exported ONNX detector in onnxruntime, batched, without ultralytics at run time.

The serving path must not pay ultralytics' per-call Python (predictor set-up, torch tensors, ``Results`` objects),
so this module re-does the three steps ultralytics wraps around the graph, the same way it does them:

- letterbox: scale each image to fit ``imgsz`` keeping its aspect ratio (the resize is per image, in the caller's
  thread); the padding, BGR→RGB, HWC→CHW and the /255 are done once for the whole batch on one array. When the
  graph has dynamic height/width the batch is padded only to the stride-aligned size its largest image needs
  (ultralytics' "minimum rectangle"), so wide photos do not pay for a square canvas;
- the graph: one ``InferenceSession.run`` per batch. Before the session is built, a Softmax over an inner axis (the
  DFL box head's, over its 16 bins) is written as the same arithmetic in reductions
  (:func:`inner_softmax_as_reductions`): onnxruntime's CPU Softmax transposes the tensor for an axis that is not
  the last, and spent about a tenth of the whole graph's time there;
- decoding: best class per anchor, confidence filter, class-aware greedy NMS (OpenCV's
  ``cv2.dnn.NMSBoxesBatched``: the same greedy rule as ultralytics' ``torchvision.ops.nms`` with per-class
  offsets, in C++), and the boxes mapped back to the original image's pixels. Graphs exported with ``nms=True``
  or end-to-end heads (``[B, max_det, 6]`` outputs) skip the NMS.

Class names, ``imgsz`` and ``stride`` come from the metadata ultralytics writes into the ONNX file.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PAD_VALUE = 114  # ultralytics' letterbox grey
MAX_NMS = 30000  # candidates kept for NMS, by confidence


class OnnxModelError(ValueError):
    """The ONNX file cannot be used as a detector; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Prepared:
    """One image after the per-image part of the letterbox: resized, not yet padded."""

    image: np.ndarray  # (h', w', 3) uint8, BGR as decoded by OpenCV
    orig_hw: tuple[int, int]
    original: np.ndarray | None = None  # the decoded image: crops for a cascade, or a re-prepare after a swap
    target: tuple[int, int] | None = None  # the imgsz it was resized for


@dataclass
class Detections:
    """Boxes in the original image's pixels (x1, y1, x2, y2), their confidences and model class indices."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)


def _literal(meta: dict[str, str], key: str, default: object = None) -> object:
    if key not in meta:
        return default
    try:
        return ast.literal_eval(meta[key])
    except (ValueError, SyntaxError):
        return meta[key]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware greedy NMS (xyxy boxes): indices kept, best first, ties in input order.

    OpenCV's C++ loop, the rule of ``torchvision.ops.nms`` that ultralytics calls (suppress IoU > threshold, best
    score first). A numpy loop pays a round of array calls per kept box: 0.27 ms for 80 candidates against 0.015.
    """
    import cv2

    if not len(scores):
        return np.zeros((0,), np.int64)
    xywh = np.empty((len(boxes), 4), np.float64)
    xywh[:, :2] = boxes[:, :2]
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    # score_threshold -1: the confidence filter has been applied already, keep every candidate
    kept = cv2.dnn.NMSBoxesBatched(xywh, scores.astype(np.float32), classes.astype(np.int32), -1.0, iou_threshold)
    return np.asarray(kept, np.int64).reshape(-1)


def inner_softmax_as_reductions(model: Any) -> int:
    """Rewrite in place each Softmax over a non-last axis as exp(x − max) / Σ exp(x − max) along that axis.

    The same arithmetic onnxruntime's kernel does, as ReduceMax, Sub, Exp, ReduceSum, Div, which run along the axis
    where the tensor lies instead of transposing it there and back: on YOLO's DFL head, (B, 16, 4, anchors) over
    axis 1, 0.2 ms instead of 0.8 ms per image on one core; outputs agree to float rounding (about 1e-6 relative).
    Needs opset ≥ 13 (older Softmax flattens the trailing axes); returns the number rewritten. A positive axis that
    happens to be the last is rewritten too (as correct, about as fast): knowing ranks would need onnx's shape
    inference, which holds the GIL for tens of ms while the server is answering requests.
    """
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13 or not any(n.op_type == "Softmax" for n in model.graph.node):
        return 0
    nodes, done = [], 0
    for node in model.graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or axis == -1:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        p = f"{node.name or y}/wanwu"
        model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), f"{p}/axes"))
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18, ReduceSum from 13
            nodes.append(helper.make_node("ReduceMax", [x, f"{p}/axes"], [f"{p}/max"], name=f"{p}/max", keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMax", [x], [f"{p}/max"], name=f"{p}/max", axes=[axis], keepdims=1))
        nodes += [
            helper.make_node("Sub", [x, f"{p}/max"], [f"{p}/sub"], name=f"{p}/sub"),
            helper.make_node("Exp", [f"{p}/sub"], [f"{p}/exp"], name=f"{p}/exp"),
            helper.make_node("ReduceSum", [f"{p}/exp", f"{p}/axes"], [f"{p}/sum"], name=f"{p}/sum", keepdims=1),
            helper.make_node("Div", [f"{p}/exp", f"{p}/sum"], [y], name=f"{p}/div"),
        ]
        done += 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return done


class OnnxDetector:
    """A YOLO detection graph exported by ultralytics, run by onnxruntime on batches of images.

    ``threads`` is onnxruntime's intra-op thread count (0: one per physical core). ``spin=False`` stops idle
    worker threads from busy-waiting, which on a small machine steals the cores the request threads decode on.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        imgsz: int | Sequence[int] | None = None,
        threads: int = 0,
        spin: bool = False,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: ONNX file not found.")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(self._graph(), so, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise OnnxModelError(f"{self.path}: onnxruntime cannot load it ({e}). Re-export the model.") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        task = meta.get("task", "detect")
        if task != "detect":
            raise OnnxModelError(f"{self.path}: task is {task!r}; the server runs detection models only.")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise OnnxModelError(f"{self.path}: input {inp.name} has shape {shape}, expected [batch, 3, h, w].")
        self.dynamic_batch = not isinstance(shape[0], int)
        self.dynamic_hw = not (isinstance(shape[2], int) and isinstance(shape[3], int))
        self.stride = int(_literal(meta, "stride", 32) or 32)
        if imgsz is None:
            imgsz = _literal(meta, "imgsz", None)
            if imgsz is None and not self.dynamic_hw:
                imgsz = (shape[2], shape[3])
            if imgsz is None:
                imgsz = 640
        if isinstance(imgsz, int):
            imgsz = (imgsz, imgsz)
        self.imgsz = (int(imgsz[0]), int(imgsz[1]))
        if not self.dynamic_hw and self.imgsz != (shape[2], shape[3]):
            self.imgsz = (int(shape[2]), int(shape[3]))  # a static graph decides
        out = self.session.get_outputs()[0]
        args = _literal(meta, "args", {}) or {}
        self.end2end = bool(_literal(meta, "end2end", False)) or bool(isinstance(args, dict) and args.get("nms"))
        names = _literal(meta, "names", None)
        if not isinstance(names, dict):
            n_out = out.shape[1] if len(out.shape) == 3 and isinstance(out.shape[1], int) else None
            if n_out is None or self.end2end:
                raise OnnxModelError(f"{self.path}: no class names in the ONNX metadata; export it with ultralytics.")
            names = {i: str(i) for i in range(n_out - 4)}
        self.names: dict[int, str] = {int(k): str(v) for k, v in names.items()}
        self.conf = float(conf)
        self.iou = float(iou)
        self.max_det = int(max_det)

    def _graph(self) -> str | bytes:
        """The file, or its bytes with inner-axis Softmaxes rewritten (:func:`inner_softmax_as_reductions`)."""
        import onnx

        try:
            model = onnx.load(str(self.path))
        except Exception:  # not readable by onnx: onnxruntime's own error is the clearer one
            return str(self.path)
        if inner_softmax_as_reductions(model) == 0 or model.ByteSize() > 1 << 30:
            return str(self.path)
        return model.SerializeToString()

    # ---- preprocessing ---------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, orig_hw: tuple[int, int] | None = None) -> Prepared:
        """The per-image half of the letterbox: resize to fit ``imgsz`` (aspect kept). BGR uint8 in.

        ``orig_hw``: the picture's real size when ``image`` was decoded smaller (a JPEG decoded at 1/2, 1/4 or 1/8
        by :func:`reduced_jpeg_factor`); boxes come back in the real size's pixels."""
        import cv2

        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        r = min(self.imgsz[0] / h, self.imgsz[1] / w)
        nw, nh = max(round(w * r), 1), max(round(h * r), 1)
        resized = image if (nw, nh) == (w, h) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return Prepared(np.ascontiguousarray(resized), orig_hw or (h, w), image, self.imgsz)

    def _canvas_hw(self, items: Sequence[Prepared]) -> tuple[int, int]:
        if not self.dynamic_hw:
            return self.imgsz
        s = self.stride
        hmax = max(p.image.shape[0] for p in items)
        wmax = max(p.image.shape[1] for p in items)
        return math.ceil(hmax / s) * s, math.ceil(wmax / s) * s

    def to_batch(self, items: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """Pad a batch onto one canvas and normalise it in one step: (B,3,H,W) float32, per-image (left, top)."""
        hc, wc = self._canvas_hw(items)
        canvas = np.full((len(items), hc, wc, 3), PAD_VALUE, dtype=np.uint8)
        pads = np.zeros((len(items), 2), dtype=np.float32)
        for k, p in enumerate(items):
            h, w = p.image.shape[:2]
            top, left = (hc - h) // 2, (wc - w) // 2
            canvas[k, top : top + h, left : left + w] = p.image
            pads[k] = (left, top)
        x = np.empty((len(items), 3, hc, wc), dtype=np.float32)
        # BGR→RGB, HWC→CHW and /255 for the whole batch in one ufunc call
        np.multiply(canvas[..., ::-1].transpose(0, 3, 1, 2), np.float32(1 / 255), out=x, casting="unsafe")
        return x, pads

    # ---- inference -------------------------------------------------------------------------------------
    def run(self, items: Sequence[Prepared]) -> list[Detections]:
        """Detect on a batch of prepared images; one ``session.run`` when the graph has a dynamic batch."""
        if not items:
            return []
        # prepared for another model's size (a hot swap between decode and batch): resize again
        items = [
            p if p.target == self.imgsz or p.original is None else self.prepare(p.original, p.orig_hw) for p in items
        ]
        x, pads = self.to_batch(items)
        if self.dynamic_batch:
            out = self.session.run(None, {self.input_name: x})[0]
        else:
            out = np.concatenate([self.session.run(None, {self.input_name: x[k : k + 1]})[0] for k in range(len(x))])
        return self.postprocess(out, items, pads)

    def predict(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Convenience: BGR uint8 images in, detections in original pixels out."""
        return self.run([self.prepare(im) for im in images])

    def warmup(self) -> None:
        """One run at full size so the first request does not pay for onnxruntime's lazy set-up."""
        h, w = self.imgsz
        self.run([Prepared(np.full((h, w, 3), PAD_VALUE, np.uint8), (h, w), None, self.imgsz)])

    # ---- postprocessing --------------------------------------------------------------------------------
    def postprocess(self, out: np.ndarray, items: Sequence[Prepared], pads: np.ndarray) -> list[Detections]:
        if self.end2end or (out.ndim == 3 and out.shape[-1] == 6 and out.shape[1] != 4 + len(self.names)):
            return self._post_end2end(out, items, pads)
        # out: (B, 4+nc, anchors). The best score per anchor is a reduction over axis 1, contiguous along the
        # anchors; the argmax (which class) is taken only for the few anchors above the threshold.
        cls_scores = out[:, 4:]
        conf = cls_scores.max(1)  # (B, anchors), whole batch at once
        keep_mask = conf > self.conf
        results = []
        for k, p in enumerate(items):
            idx = np.flatnonzero(keep_mask[k])
            if not idx.size:
                results.append(Detections())
                continue
            scores = conf[k, idx]
            if idx.size > MAX_NMS:
                top = np.argsort(-scores)[:MAX_NMS]
                idx, scores = idx[top], scores[top]
            classes = cls_scores[k][:, idx].argmax(0)
            xywh = out[k, :4, idx]  # (n, 4): advanced indexing puts the anchor axis first
            boxes = np.empty_like(xywh)
            boxes[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
            boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
            kept = batched_nms(boxes, scores, classes, self.iou)[: self.max_det]
            results.append(self._unletterbox(boxes[kept], scores[kept], classes[kept], p, pads[k]))
        return results

    def _post_end2end(self, out: np.ndarray, items: Sequence[Prepared], pads: np.ndarray) -> list[Detections]:
        results = []
        for k, p in enumerate(items):
            det = out[k]
            det = det[det[:, 4] > self.conf][: self.max_det]
            results.append(self._unletterbox(det[:, :4].copy(), det[:, 4], det[:, 5].astype(np.int64), p, pads[k]))
        return results

    @staticmethod
    def _unletterbox(
        boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, p: Prepared, pad: np.ndarray
    ) -> Detections:
        h0, w0 = p.orig_hw
        h1, w1 = p.image.shape[:2]
        gain = np.array([w1 / w0, h1 / h0, w1 / w0, h1 / h0], dtype=np.float32)
        boxes = (boxes - np.concatenate([pad, pad])) / gain
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w0)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h0)
        return Detections(boxes.astype(np.float32), scores.astype(np.float32), classes.astype(np.int64))


def reduced_jpeg_factor(hw: tuple[int, int], imgsz: tuple[int, int]) -> int:
    """1, 2, 4 or 8: the largest JPEG decode reduction that still leaves at least the letterbox's own size.

    libjpeg scales in the DCT domain while decoding (OpenCV's ``IMREAD_REDUCED_COLOR_*``): a 640×480 photo for a
    320 model decodes at 320×240 in a third of the time, and the 2:1 downscale is an area average instead of the
    letterbox's bilinear resize, which skips pixels. ``hw`` is the stored size; both orientations are checked so
    an EXIF rotation cannot make it too small.
    """
    h, w = hw
    if h <= 0 or w <= 0:
        return 1
    r = max(min(imgsz[0] / h, imgsz[1] / w), min(imgsz[0] / w, imgsz[1] / h))
    for f in (8, 4, 2):
        if f * r <= 1:
            return f
    return 1


def find_onnx(folder: str | Path) -> Path:
    """The detector file in a downloaded model folder: ``model.onnx`` nearest the top, else the only ``.onnx``."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".onnx":
        return folder
    found = sorted(folder.rglob("*.onnx"), key=lambda p: (len(p.relative_to(folder).parts), p.name != "model.onnx"))
    if not found:
        raise OnnxModelError(f"{folder}: no .onnx file in the model's artifacts. Log the model with mlflow.onnx.")
    return found[0]
