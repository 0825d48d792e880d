"""The served model: an MLflow pyfunc that takes images and returns labelled boxes, running the ONNX file.

``mlflow.pyfunc.load_model("models:/wanwu-detector@champion").predict(df)``

Input: a DataFrame with a string column ``image``; each value is a local file path (or ``file://`` URI) or the
image file's bytes in base64 (what a JSON REST call carries). Strings are the one type both a Python caller and
``mlflow models serve`` pass without conversion; a path is tried first, base64 second.

Output: one row per detected box, columns ``image`` (row number of the input), ``x1 y1 x2 y2`` (pixels of the
original image), ``class_id`` (ontology id), ``name_zh``, ``name_en``, ``confidence``. An image without
detections contributes no row. ``conf``, ``iou`` and ``max_det`` can be passed as ``params``.

This module imports only numpy, Pillow, pandas and onnxruntime (inside functions), and it is pickled *by value*
into the logged model (see :func:`wanwu.export.log_and_register`), so a registered version loads in a process
where the ``wanwu`` package is not installed. The pre- and post-processing here are also what the export
parity check runs on both the PyTorch and the ONNX outputs.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

PAD_VALUE = 114  # ultralytics' letterbox grey
OUTPUT_COLUMNS = ["image", "x1", "y1", "x2", "y2", "class_id", "name_zh", "name_en", "confidence"]


def letterbox(image: Any, imgsz: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping the aspect ratio and pad to ``imgsz``², as ultralytics does; return NCHW float32 in 0..1,
    the scale and the (left, top) padding, to map boxes back to the original pixels."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert("RGB")
    w, h = img.size
    r = min(imgsz / w, imgsz / h)
    nw, nh = round(w * r), round(h * r)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (imgsz - nw) / 2, (imgsz - nh) / 2
    canvas = np.full((imgsz, imgsz, 3), PAD_VALUE, dtype=np.uint8)
    x0, y0 = round(left - 0.1), round(top - 0.1)
    canvas[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(img)
    tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(tensor), r, (x0, y0)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between two (n, 4) and (m, 4) xyxy arrays."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    return np.stack([_iou_one_to_many(box, b) for box in a])


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_det: int) -> np.ndarray:
    """Class-aware greedy NMS (the same rule as torchvision's batched_nms); returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    # offset boxes per class so boxes of different classes never overlap (the batched_nms trick)
    shifted = boxes + (classes[:, None].astype(np.float32) * (boxes.max() + 1.0 if len(boxes) else 0.0))
    while order.size and len(keep) < max_det:
        i = order[0]
        keep.append(int(i))
        if order.size == 1:
            break
        ious = _iou_one_to_many(shifted[i], shifted[order[1:]])
        order = order[1:][ious <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(raw: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> np.ndarray:
    """YOLO detect output (4 + nc, anchors) for one image → (n, 6) rows x1 y1 x2 y2 score class in input pixels."""
    pred = np.asarray(raw, dtype=np.float32).T  # anchors × (4 + nc)
    scores_all = pred[:, 4:]
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(pred)), cls]
    mask = score > conf
    if not mask.any():
        return np.zeros((0, 6), dtype=np.float32)
    xywh, score, cls = pred[mask, :4], score[mask], cls[mask]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    keep = nms(xyxy, score, cls, iou, max_det)
    return np.concatenate([xyxy[keep], score[keep, None], cls[keep, None].astype(np.float32)], axis=1)


def to_original(det: np.ndarray, scale: float, pad: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Map boxes from the letterboxed input back to the original image's pixels (clipped to it)."""
    out = det.copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad[0]) / scale).clip(0, size[0])
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad[1]) / scale).clip(0, size[1])
    return out


def open_image(value: Any) -> Any:
    """A path, ``file://`` URI, raw bytes or base64 string → a PIL image."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    text = str(value)
    path = Path(text.removeprefix("file://"))
    if len(text) < 4096 and path.is_file():
        return Image.open(path)
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(
            f"image value {text[:80]!r} is neither an existing file path nor base64-encoded image bytes"
        ) from None
    return Image.open(io.BytesIO(data))


class Detector:
    """The ONNX detector with its labels; usable without MLflow (the serve stage and the tests use it too)."""

    def __init__(self, onnx_path: str | Path, labels: dict[str, Any], threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.imgsz = int(labels["imgsz"])
        self.names_zh = {int(k): v for k, v in labels["names_zh"].items()}
        self.names_en = {int(k): v for k, v in labels["names_en"].items()}

    @classmethod
    def from_files(cls, onnx_path: str | Path, labels_path: str | Path) -> Detector:
        return cls(onnx_path, json.loads(Path(labels_path).read_text(encoding="utf-8")))

    def raw(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: tensor})[0]

    def detect(self, image: Any, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[dict[str, Any]]:
        img = open_image(image) if not hasattr(image, "convert") else image
        img = img.convert("RGB")
        tensor, scale, pad = letterbox(img, self.imgsz)
        det = to_original(postprocess(self.raw(tensor)[0], conf, iou, max_det), scale, pad, img.size)
        return [
            {
                "x1": float(d[0]),
                "y1": float(d[1]),
                "x2": float(d[2]),
                "y2": float(d[3]),
                "class_id": int(d[5]),
                "name_zh": self.names_zh.get(int(d[5]), str(int(d[5]))),
                "name_en": self.names_en.get(int(d[5]), str(int(d[5]))),
                "confidence": float(d[4]),
            }
            for d in det
        ]


def _make_pyfunc_class() -> type:
    import pandas as pd
    from mlflow.pyfunc import PythonModel

    class WanwuDetector(PythonModel):
        """MLflow pyfunc: DataFrame of images (column ``image``) → DataFrame of labelled boxes (see module doc)."""

        def load_context(self, context):
            cfg = dict(context.model_config or {})
            self.defaults = {
                "conf": float(cfg.get("conf", 0.25)),
                "iou": float(cfg.get("iou", 0.7)),
                "max_det": int(cfg.get("max_det", 300)),
            }
            self.detector = Detector.from_files(context.artifacts["onnx"], context.artifacts["labels"])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            opts = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
            if isinstance(model_input, pd.DataFrame):
                if "image" not in model_input.columns:
                    raise ValueError(f"input needs a column 'image' (path or base64), got {list(model_input.columns)}")
                values = model_input["image"].tolist()
            else:
                values = list(model_input) if isinstance(model_input, (list, tuple)) else [model_input]
            rows = []
            for i, value in enumerate(values):
                for box in self.detector.detect(
                    open_image(value), float(opts["conf"]), float(opts["iou"]), int(opts["max_det"])
                ):
                    rows.append({"image": i, **box})
            return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)

        # A DataFrame hint tells MLflow not to infer a schema from hints: the signature is given when logging.
        predict.__annotations__ = {"model_input": pd.DataFrame, "return": pd.DataFrame}  # noqa: RUF012

    return WanwuDetector


def __getattr__(name: str) -> Any:
    # Built on first use: importing this module (the export and serve code do) must not import mlflow.
    if name == "WanwuDetector":
        cls = _make_pyfunc_class()
        globals()["WanwuDetector"] = cls
        return cls
    raise AttributeError(name)
