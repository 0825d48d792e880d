"""Teachers: recognizers that name what is inside a box, behind one small interface.

``Teacher.predict_proba(crops) -> (N, len(teacher.labels))`` — crops in (PIL images or RGB uint8 arrays),
probabilities over the model's *own* label list out, computed in batches of ``batch_size`` crops per forward
pass with no temp files. :class:`OntologyMapping` then projects a teacher's labels onto ontology ids through the
ontology's synonym lookup; labels that map to nothing become "other" (column K, id −1) and are kept as such.

One adapter per model family:

* :class:`UltralyticsClassifier` — an ultralytics classification checkpoint (``yolo11n-cls`` and kin);
* :class:`TorchvisionClassifier` — a torchvision or timm architecture with a state_dict, loaded with
  ``torch.load(weights_only=True)`` only (no pickled code from untrusted files);
* :class:`ModelScopeGeneralRecognition` — ModelScope's 万物识别 (general recognition, ResNeSt-101) from a local
  model directory (``pytorch_model.pt`` + ``meta_info.txt``), with the full softmax and top-k computed here,
  batched, on any device (ModelScope's pipeline returns only a top-1 raw logit, one image a call, on the CPU);
* :class:`OpenClipZeroShot` — open_clip zero-shot with the ontology's Chinese and English prompts, local weights.

:func:`train_domain_experts` trains the sample world's default teacher: one ultralytics classifier per domain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from wanwu.models.proposer import file_sha256, name_index, resolve_device
from wanwu.ontology import OTHER_EN, OTHER_ID, Ontology, normalize_name

if TYPE_CHECKING:
    from wanwu.training import FitResult

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(RuntimeError):
    """A teacher cannot be loaded or run; the message names the file and the fix."""


def _as_rgb_arrays(crops: Sequence[Any]) -> list[Any]:
    from PIL import Image

    out = []
    for c in crops:
        if isinstance(c, Image.Image):
            out.append(c if c.mode == "RGB" else c.convert("RGB"))
        else:
            out.append(Image.fromarray(np.asarray(c, dtype=np.uint8)))
    return out


def resize_stack(crops: Sequence[Any], size: int, resize: int | None = None) -> np.ndarray:
    """Crops → (N, 3, size, size) float32 in 0..1: resize the shorter side to ``resize`` (default ``size``),
    centre-crop ``size`` — torchvision's eval transform, done once per crop with Pillow and stacked."""
    from PIL import Image

    resize = resize or size
    out = np.empty((len(crops), size, size, 3), np.uint8)
    for i, im in enumerate(_as_rgb_arrays(crops)):
        w, h = im.size
        if w <= h:  # torchvision's rounding: the short side exact, the long side truncated
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)  # torchvision's CenterCrop rounding
        out[i] = np.asarray(im.crop((left, top, left + size, top + size)))
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


class Teacher(ABC):
    """Crops in, probabilities over ``labels`` out. Subclasses implement ``_forward`` on one batch."""

    kind: ClassVar[str] = "teacher"

    def __init__(self, name: str, batch_size: int = 256, device: str = "auto"):
        self.name = name
        self.batch_size = max(1, int(batch_size))
        self.device = resolve_device(device)
        self.labels: list[str] = []
        self.calls = 0  # forward passes: what the labeling cache test counts
        self.items = 0
        self._lock = threading.Lock()

    def predict_proba(self, crops: Sequence[Any] | np.ndarray) -> np.ndarray:
        """(N, len(labels)) float32 probabilities, rows summing to 1.

        ``crops``: PIL images, RGB uint8 arrays (a list, or one (N, H, W, 3) array), or what :meth:`prepare`
        returned — float32 (N, 3, S, S) — so teachers with the same input share one resize of the crops.
        """
        import torch

        if len(crops) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        prepared = isinstance(crops, np.ndarray) and crops.ndim == 4 and crops.dtype != np.uint8
        parts = []
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start : start + self.batch_size]
            x = batch if prepared else self.prepare(batch)
            with self._lock, torch.inference_mode():
                parts.append(np.asarray(self._forward(x), dtype=np.float32))
                self.calls += 1
                self.items += len(batch)
        return np.concatenate(parts)

    def prepare(self, crops: Sequence[Any]) -> np.ndarray:
        """Crops → the model's input batch (float32, N×3×S×S); the default is torchvision's eval resize."""
        return resize_stack(crops, self.imgsz, getattr(self, "resize", None))

    def prepare_key(self) -> tuple:
        """Teachers with equal keys take the same prepared batch (the labeling engine resizes once for them)."""
        return ("resize", self.imgsz, getattr(self, "resize", None))

    def topk(self, crops: Sequence[Any], k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most probable labels per crop, best first (the full softmax is computed, then sorted)."""
        p = self.predict_proba(crops)
        idx = np.argsort(-p, axis=1)[:, :k]
        return [[(self.labels[j], float(p[i, j])) for j in row] for i, row in enumerate(idx)]

    @abstractmethod
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """One prepared batch → probabilities."""

    @abstractmethod
    def weight_files(self) -> list[Path]: ...

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": self.labels}

    def version(self) -> str:
        """Content hash of the weights, the label list and the preprocessing: part of the labeling cache key."""
        h = hashlib.sha256()
        for f in self.weight_files():
            h.update(file_sha256(f).encode())
        h.update(json.dumps(self.config(), sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


class OntologyMapping:
    """A teacher's labels → ontology columns: 0..K-1 are ontology ids, column K is "other" (id −1).

    ``matrix`` is (L, K+1), one 1 per row, so ``probs @ matrix`` sums the probability of every label that names
    the same class (synonyms in a 54k-label space) and of every unknown label into "other".
    """

    def __init__(self, labels: Sequence[str], ontology: Ontology):
        index = name_index(ontology)
        self.k = len(ontology)
        self.ids = np.array([index.get(normalize_name(lbl), OTHER_ID) for lbl in labels], dtype=np.int32)
        self.matrix = np.zeros((len(labels), self.k + 1), np.float32)
        self.matrix[np.arange(len(labels)), np.where(self.ids >= 0, self.ids, self.k)] = 1.0
        self.unmapped = [lbl for lbl, i in zip(labels, self.ids, strict=True) if i < 0]
        self.coverage = self.matrix.any(axis=0)  # which ontology columns (and "other") this teacher can say

    def project(self, probs: np.ndarray) -> np.ndarray:
        return probs @ self.matrix

    @staticmethod
    def column_ids(k: int) -> np.ndarray:
        return np.array([*range(k), OTHER_ID], dtype=np.int32)


def project_all(
    teachers: Sequence[Teacher], mappings: Sequence[OntologyMapping], crops: Sequence[Any]
) -> list[np.ndarray]:
    """Every teacher on every crop, projected onto the ontology columns.

    Crops go through in chunks of the largest teacher batch; within a chunk, teachers with the same input
    (:meth:`Teacher.prepare_key`) share one prepared batch, so four 32-px experts resize each crop once.
    """
    if not teachers:
        return []
    chunk = max(t.batch_size for t in teachers)
    outs: list[list[np.ndarray]] = [[] for _ in teachers]
    for start in range(0, len(crops), chunk):
        part = crops[start : start + chunk]
        prepared: dict[tuple, np.ndarray] = {}
        for i, t in enumerate(teachers):
            key = t.prepare_key()
            if key not in prepared:
                prepared[key] = t.prepare(part)
            outs[i].append(t.predict_proba(prepared[key]))
    return [
        m.project(np.concatenate(o) if o else np.zeros((0, len(t.labels)), np.float32))
        for t, m, o in zip(teachers, mappings, outs, strict=True)
    ]


def topk_ids(probs_onto: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over ontology columns: (ids with −1 for "other", probabilities), best first; ties by lower column."""
    n_cols = probs_onto.shape[1]
    k = min(k, n_cols)
    order = np.argsort(-probs_onto, axis=1, kind="stable")[:, :k]
    ids = OntologyMapping.column_ids(n_cols - 1)[order]
    return ids.astype(np.int32), np.take_along_axis(probs_onto, order, axis=1).astype(np.float32)


# ---- ultralytics -------------------------------------------------------------------------------------------


class UltralyticsClassifier(Teacher):
    """An ultralytics classification checkpoint (``*-cls.pt``). Its labels are the checkpoint's class names.

    Preprocessing is ultralytics' own eval transform (shorter side to imgsz, centre crop, 0..1, no mean/std),
    done for the whole batch, then one forward pass; the head returns the softmax in eval mode.
    """

    kind = "ultralytics"

    def __init__(self, path: str | Path, name: str | None = None, imgsz: int | None = None, **kw: Any):
        super().__init__(name or Path(path).stem, **kw)
        from wanwu.checkpoints import CheckpointError, load_ultralytics

        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherError(f"{self.path}: ultralytics classification checkpoint not found.")
        try:
            model, ckpt = load_ultralytics(self.path, "teacher path", device=self.device)
        except CheckpointError as e:
            raise TeacherError(str(e)) from e
        if getattr(model, "task", None) != "classify":
            raise TeacherError(f"{self.path}: a {getattr(model, 'task', '?')} checkpoint, not a classifier (*-cls).")
        self.model = model.float().eval()
        names = model.names
        self.labels = [names[i] for i in range(len(names))]
        size = imgsz or (ckpt.get("train_args") or {}).get("imgsz") or 224
        self.imgsz = int(size if isinstance(size, int) else max(size))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        y = self.model(torch.from_numpy(x).to(self.device))
        y = y[0] if isinstance(y, (tuple, list)) else y
        return y.float().cpu().numpy()

    def weight_files(self) -> list[Path]:
        return [self.path]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "imgsz": self.imgsz}


# ---- torchvision / timm ------------------------------------------------------------------------------------


def _read_labels(spec: str | Path | Sequence[str]) -> list[str]:
    if isinstance(spec, (list, tuple)):
        return [str(x) for x in spec]
    path = Path(spec)
    if not path.is_file():
        raise TeacherError(f"{path}: labels file not found (one label per line, or a JSON list).")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return [str(x) for x in (data if isinstance(data, list) else [data[k] for k in sorted(data, key=int)])]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def _safe_load(path: Path) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TeacherError(
            f"{path}: not loadable with torch.load(weights_only=True): it holds pickled code ({e}). wanwu only "
            "loads tensors from teacher files: re-save it as a state_dict (torch.save(model.state_dict(), path))."
        ) from None


class TorchvisionClassifier(Teacher):
    """A torchvision or timm architecture plus its weights, loaded with ``torch.load(weights_only=True)``.

    Formats: (a) a plain state_dict file with ``arch`` and ``labels`` (a list or a file: one label per line, or a
    JSON list) given here; (b) a bundle ``{"state_dict": ..., "arch": ..., "labels": [...], "library": ...,
    "imgsz": ..., "mean": ..., "std": ...}`` saved with ``torch.save`` — the arguments given here win.
    """

    kind = "torchvision"

    def __init__(
        self,
        path: str | Path,
        arch: str | None = None,
        labels: str | Path | Sequence[str] | None = None,
        library: str | None = None,
        name: str | None = None,
        imgsz: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kw: Any,
    ):
        super().__init__(name or Path(path).stem, **kw)
        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherError(f"{self.path}: classifier weights not found.")
        raw = _safe_load(self.path)
        bundle = raw if isinstance(raw, dict) and "state_dict" in raw else {}
        self.arch = arch or bundle.get("arch")
        self.library = library or bundle.get("library") or "torchvision"
        labels = labels if labels is not None else bundle.get("labels")
        if not self.arch or labels is None:
            raise TeacherError(
                f"{self.path}: say which architecture and labels these weights are for (teacher keys `arch` and "
                "`labels`, or save a bundle with 'arch' and 'labels' beside 'state_dict')."
            )
        self.labels = _read_labels(labels)
        self.imgsz = int(imgsz or bundle.get("imgsz") or 224)
        self.mean = tuple(mean or bundle.get("mean") or IMAGENET_MEAN)
        self.std = tuple(std or bundle.get("std") or IMAGENET_STD)
        state = _strip_module(raw)
        n = len(self.labels)
        if self.library == "timm":
            import timm

            try:
                model = timm.create_model(self.arch, pretrained=False, num_classes=n)
            except RuntimeError as e:
                raise TeacherError(f"{self.path}: timm has no architecture {self.arch!r} ({e}).") from None
        elif self.library == "torchvision":
            import torchvision

            try:
                model = torchvision.models.get_model(self.arch, weights=None, num_classes=n)
            except ValueError as e:
                raise TeacherError(f"{self.path}: torchvision has no architecture {self.arch!r} ({e}).") from None
        else:
            raise TeacherError(f"{self.path}: library {self.library!r} is neither 'torchvision' nor 'timm'.")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise TeacherError(
                f"{self.path}: the weights do not fit {self.library} {self.arch!r} with {n} labels: {str(e)[:400]}"
            ) from None
        self.model = model.eval().to(self.device)
        self.kind = self.library

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(x).to(self.device)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return torch.softmax(self.model((t - mean) / std).float(), dim=1).cpu().numpy()

    def weight_files(self) -> list[Path]:
        return [self.path]

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "arch": self.arch,
            "library": self.library,
            "imgsz": self.imgsz,
            "mean": self.mean,
            "std": self.std,
        }


# ---- ModelScope general recognition (万物识别) ------------------------------------------------------------


def read_meta_info(path: Path) -> list[str]:
    """ModelScope's ``meta_info.txt``: one class a line, tab-separated, the label in column 2 (column 1 if alone)."""
    labels = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
        labels.append((cols[1] if len(cols) > 1 else cols[0]).strip())
    return labels


def resnest_layout(state: dict[str, Any]) -> dict[str, Any]:
    """Read a ResNeSt's shape from its state_dict: blocks per stage, stem width, class count.

    ModelScope's general recognition is ResNeSt-101 (blocks 3, 4, 23, 3; deep stem 64; radix 2; avg-down;
    avd), written with the key names of the original ResNeSt code (``conv1.0``…``conv1.6``, ``layerN.M.conv2.
    {conv,bn0,fc1,bn1,fc2}``, ``downsample.1/.2``, ``fc``) — the names timm's ``resnest*`` models use too. Reading
    the layout instead of hard-coding it lets the same code path load a 101-layer checkpoint and a tiny test one.
    """
    layers = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise TeacherError(f"no layer{stage}.* keys: not a ResNeSt state_dict (keys start {list(state)[:5]})")
        layers.append(max(blocks) + 1)
    if "conv1.0.weight" not in state or "fc.weight" not in state:
        raise TeacherError("no conv1.0.weight / fc.weight: not a ResNeSt (deep stem) state_dict")
    return {
        "layers": layers,
        "stem_width": int(state["conv1.0.weight"].shape[0]),
        "num_classes": int(state["fc.weight"].shape[0]),
    }


class ModelScopeGeneralRecognition(Teacher):
    """ModelScope 万物识别 (``damo/cv_resnest101_general_recognition``) from a local model directory.

    Reads ``pytorch_model.pt`` (a state_dict, optionally under ``state_dict`` and/or with ``module.`` prefixes,
    loaded with ``weights_only=True``) and ``meta_info.txt``; builds the ResNeSt with timm (same key names);
    preprocesses like ModelScope (resize 256, centre crop 224, ImageNet mean/std) but for a whole batch; returns
    the full softmax over every label (ModelScope's pipeline gives only the top-1 raw logit).
    """

    kind = "modelscope"
    WEIGHTS = "pytorch_model.pt"
    META = "meta_info.txt"

    def __init__(
        self, model_dir: str | Path, name: str | None = None, imgsz: int = 224, resize: int | None = None, **kw: Any
    ):
        super().__init__(name or Path(model_dir).name, **kw)
        import timm

        self.model_dir = Path(model_dir)
        weights, meta = self.model_dir / self.WEIGHTS, self.model_dir / self.META
        for f in (weights, meta):
            if not f.is_file():
                raise TeacherError(
                    f"{f}: missing. A ModelScope general-recognition model directory holds {self.WEIGHTS} and "
                    f"{self.META} (fetch it once where there is a network: "
                    "modelscope download damo/cv_resnest101_general_recognition)."
                )
        self.labels = read_meta_info(meta)
        state = _strip_module(_safe_load(weights))
        try:
            layout = resnest_layout(state)
        except TeacherError as e:
            raise TeacherError(f"{weights}: {e}") from None
        if layout["num_classes"] != len(self.labels):
            raise TeacherError(
                f"{weights}: {layout['num_classes']} classes in the weights but {len(self.labels)} lines in {meta}."
            )
        self.layout = layout
        model = timm.create_model(
            "resnest101e",
            pretrained=False,
            num_classes=layout["num_classes"],
            layers=layout["layers"],
            stem_width=layout["stem_width"],
        )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise TeacherError(f"{weights}: does not fit a ResNeSt {layout}: {str(e)[:400]}") from None
        self.model = model.eval().to(self.device)
        self.imgsz = int(imgsz)
        self.resize = int(resize or round(imgsz * 256 / 224))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(x).to(self.device)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        return torch.softmax(self.model((t - mean) / std).float(), dim=1).cpu().numpy()

    def weight_files(self) -> list[Path]:
        return [self.model_dir / self.WEIGHTS, self.model_dir / self.META]

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_labels": len(self.labels), "imgsz": self.imgsz, "resize": self.resize}


# ---- open_clip zero-shot -----------------------------------------------------------------------------------


class OpenClipZeroShot(Teacher):
    """open_clip zero-shot over the ontology: each class's Chinese and English prompts, averaged.

    ``model`` is ``local-dir:/path`` (an open_clip folder: ``open_clip_config.json`` + weights, the layout of a
    hub snapshot) or a model name with ``pretrained`` a local weights file (``config`` may register a model
    config JSON first). Labels are the ontology's English names (plus ``other`` when ``other_prompts`` is not
    empty), so the mapping onto ids is exact. A multilingual text tower reads the Chinese prompts as Chinese;
    an English-only one gets them as bytes and mostly relies on the English prompts.
    """

    kind = "open_clip"

    def __init__(
        self,
        model: str,
        ontology: Ontology,
        pretrained: str | Path | None = None,
        config: str | Path | None = None,
        name: str | None = None,
        other_prompts: Sequence[str] = ("一张其他物体的照片", "a photo of some other object"),
        **kw: Any,
    ):
        super().__init__(name or "open_clip", **kw)
        import open_clip
        import torch

        self.model_name = model
        self.pretrained = Path(pretrained) if pretrained else None
        self.config_path = Path(config) if config else None
        if self.config_path is not None:
            if not self.config_path.is_file():
                raise TeacherError(f"{self.config_path}: open_clip model config not found.")
            open_clip.add_model_config(self.config_path)
        if model.startswith("local-dir:"):
            folder = Path(model.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise TeacherError(
                    f"{folder}: no open_clip_config.json (an open_clip model folder holds it and weights)."
                )
        elif self.pretrained is None or not self.pretrained.is_file():
            raise TeacherError(
                f"open_clip {model!r}: give local weights (pretrained: /path/to/weights) or model: local-dir:/folder; "
                "nothing is downloaded."
            )
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=str(self.pretrained) if self.pretrained else None, device=self.device
            )
        except Exception as e:
            raise TeacherError(f"open_clip {model!r} with weights {self.pretrained}: {e}") from None
        self.model = clip.eval()
        self.transform = preprocess
        tokenizer = open_clip.get_tokenizer(model)
        prompts = [list(c.prompts) or [c.zh, c.en] for c in ontology.classes]
        self.labels = [c.en for c in ontology.classes]
        if other_prompts:
            prompts.append(list(other_prompts))
            self.labels.append(OTHER_EN)
        self.prompts = prompts
        with torch.inference_mode():
            rows = []
            for group in prompts:
                t = self.model.encode_text(tokenizer(group).to(self.device)).float()
                t = t / t.norm(dim=-1, keepdim=True)
                m = t.mean(0)
                rows.append(m / m.norm())
            self.text = torch.stack(rows)

    def prepare(self, crops: Sequence[Any]) -> np.ndarray:
        import torch

        return torch.stack([self.transform(im) for im in _as_rgb_arrays(crops)]).numpy()

    def prepare_key(self) -> tuple:
        return ("open_clip", id(self))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        f = self.model.encode_image(torch.from_numpy(x).to(self.device)).float()
        f = f / f.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp().float() * f @ self.text.T
        if getattr(self.model, "logit_bias", None) is not None:
            logits = logits + self.model.logit_bias.float()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def weight_files(self) -> list[Path]:
        if self.model_name.startswith("local-dir:"):
            folder = Path(self.model_name.removeprefix("local-dir:"))
            return sorted(p for p in folder.iterdir() if p.is_file())
        return [p for p in (self.pretrained, self.config_path) if p is not None]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "model": self.model_name, "prompts": self.prompts}


# ---- building teachers from params -------------------------------------------------------------------------


def build_teacher(spec: dict[str, Any], ontology: Ontology, device: str = "auto") -> Teacher:
    """One teacher from a params entry ``{kind, path, name, arch, labels, config, imgsz, batch}``."""
    kind = spec["kind"]
    common = {"name": spec.get("name") or None, "batch_size": spec.get("batch") or 256, "device": device}
    path = spec.get("path")
    if kind == "ultralytics":
        return UltralyticsClassifier(path, imgsz=spec.get("imgsz"), **common)
    if kind in ("torchvision", "timm"):
        return TorchvisionClassifier(
            path, arch=spec.get("arch"), labels=spec.get("labels"), library=kind, imgsz=spec.get("imgsz"), **common
        )
    if kind == "modelscope":
        return ModelScopeGeneralRecognition(path, imgsz=spec.get("imgsz") or 224, **common)
    if kind == "open_clip":
        model = spec.get("arch") or (f"local-dir:{path}" if path and Path(path).is_dir() else None)
        if model is None:
            raise TeacherError(
                "open_clip teacher: set `arch` (model name) with `path` (weights), or `path` to a folder."
            )
        pretrained = None if model.startswith("local-dir:") else path
        return OpenClipZeroShot(model, ontology, pretrained=pretrained, config=spec.get("config"), **common)
    raise TeacherError(f"teacher kind {kind!r}: choose ultralytics, torchvision, timm, modelscope or open_clip.")


# ---- the sample world's default teacher: one expert per domain ---------------------------------------------

CROP_CONTEXT = 1.0  # square crop side / the box's longer side (autolabel.crop_context's default; README: 1.3 → 1.0)


def square_crop(image: Any, box: Sequence[float], context: float = CROP_CONTEXT) -> Any:
    """A square crop around a box, ``context`` × its longer side, shifted to stay inside the image where it fits
    (so truncated objects keep real pixels around them instead of padding)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = image.size
    side = max(x2 - x1, y2 - y1, 2.0) * context
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = cx - side / 2, cy - side / 2
    if side <= w:
        left = min(max(left, 0.0), w - side)
    if side <= h:
        top = min(max(top, 0.0), h - side)
    return image.crop((round(left), round(top), round(left + side), round(top + side)))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def generic_crops(
    generic_yaml: Path, out_dir: Path, per_split: dict[str, int], size: int, context: float, seed: int = 0
) -> dict[str, list[Path]]:
    """Object crops from the generic detection corpus: examples of "other" (objects in no class)."""
    import yaml
    from PIL import Image

    g = yaml.safe_load(Path(generic_yaml).read_text(encoding="utf-8"))
    root = Path(g.get("path") or Path(generic_yaml).parent)
    out: dict[str, list[Path]] = {}
    for split, n in per_split.items():
        folder = out_dir / split
        existing = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if len(existing) >= n:
            out[split] = existing[:n]
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 7, len(split)])
        imgs = sorted((root / g[split]).glob("*.*"))
        paths: list[Path] = []
        for img_path in rng.permutation(imgs) if len(imgs) else []:
            if len(paths) >= n:
                break
            lbl = (
                Path(str(img_path.parent).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"))
                / f"{Path(img_path).stem}.txt"
            )
            if not lbl.is_file():
                continue
            rows = [r.split() for r in lbl.read_text().splitlines() if len(r.split()) == 5]
            if not rows:
                continue
            im = Image.open(img_path).convert("RGB")
            W, H = im.size
            _, cx, cy, bw, bh = (float(v) for v in rows[int(rng.integers(len(rows)))])
            if bw * W < 8 or bh * H < 8:
                continue
            box = ((cx - bw / 2) * W, (cy - bh / 2) * H, (cx + bw / 2) * W, (cy + bh / 2) * H)
            dst = folder / f"{len(paths):05d}.png"
            square_crop(im, box, context).resize((size, size), Image.BILINEAR).save(dst)
            paths.append(dst)
        out[split] = paths
    return out


def build_expert_datasets(
    catalogue: Path,
    out_dir: Path,
    other: dict[str, list[Path]],
    *,
    other_from_domains: int = 40,
    seed: int = 0,
    single: bool = True,
    in_domain: dict[int, list[Path]] | None = None,
    ontology: Ontology | None = None,
    batch: int | None = None,
) -> dict[str, Path]:
    """Ultralytics classification folders, one per domain (its classes + ``other``) and, with ``single``, one
    ``_all`` over every class: the baseline a fusion of experts must beat.

    A domain's ``other`` holds generic-corpus object crops plus ``other_from_domains`` images per other domain,
    so an expert learns to say "not mine" instead of forcing a cat onto a rose. Files are hard-linked.

    ``in_domain`` (ontology id → crop files, ``OTHER_ID`` for other; needs ``ontology``) adds crops cut from real
    scenes to the train split: each expert gets its own classes' crops under their class and, under ``other``, as
    many ``OTHER_ID`` crops as it has generic ones plus ``other_from_domains`` crops per other domain (every
    unmatched box made "other" outweigh an expert's classes: the fusion then called true objects "other", objects
    0.73 → 0.66 on the quick run's gold crops; capped, 0.72); ``_all`` gets every crop, each under its class or
    ``other``. The val split stays the catalogue's. ``batch``: the experts' training batch (see
    :func:`_add_in_domain`).
    """
    domains = sorted(p.name for p in catalogue.iterdir() if p.is_dir() and (p / "train").is_dir())
    if not domains:
        raise TeacherError(f"{catalogue}: no <domain>/train/<class>/ folders: nothing to train experts on.")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    rng = np.random.default_rng([seed, 11])
    out: dict[str, Path] = {}
    for domain in [*domains, "_all"] if single else domains:
        root = out_dir / domain
        for split in ("train", "val"):
            members = domains if domain == "_all" else [domain]
            for d in members:
                for cls_dir in sorted((catalogue / d / split).iterdir()):
                    for f in sorted(cls_dir.glob("*.*")):
                        _link(f, root / split / cls_dir.name / f.name)
            for i, f in enumerate(other.get(split, [])):
                _link(f, root / split / OTHER_EN / f"g{i:05d}{f.suffix}")
            if domain != "_all":
                n = other_from_domains if split == "train" else max(1, other_from_domains // 4)
                for d in domains:
                    if d == domain:
                        continue
                    files = sorted((catalogue / d / split).glob("*/*.*"))
                    for f in rng.permutation(files)[:n] if files else []:
                        _link(Path(f), root / split / OTHER_EN / f"{d}_{Path(f).parent.name}_{Path(f).name}")
        if in_domain:
            _add_in_domain(
                root,
                catalogue,
                domains if domain == "_all" else [domain],
                in_domain,
                ontology,
                rng,
                other_from_domains if domain != "_all" else None,
                len(other.get("train", [])) if domain != "_all" else None,
                batch,
            )
        out[domain] = root
    return out


def _add_in_domain(
    root: Path,
    catalogue: Path,
    members: list[str],
    crops: dict[int, list[Path]],
    ontology: Ontology | None,
    rng: np.random.Generator,
    per_other_domain: int | None,
    max_other: int | None,
    batch: int | None,
) -> None:
    """Link scene crops into one expert's train split (see :func:`build_expert_datasets`); ``per_other_domain``
    None: every crop of a class the expert does not know goes under ``other`` (the ``_all`` model knows them all);
    ``max_other``: at most this many of the ``OTHER_ID`` crops (None: all). With ``batch``, one crop fewer when the
    split would end in a batch of one image, which stops ultralytics (BatchNorm): scene crops make any count."""
    if ontology is None:
        raise TeacherError("in-domain crops need the ontology to find each class's catalogue folder.")
    cls_dirs = [c for d in members for c in sorted((catalogue / d / "train").iterdir()) if c.is_dir()]
    ids = OntologyMapping([c.name for c in cls_dirs], ontology).ids  # the experts' own name → class lookup
    folder_of = {int(i): c.name for i, c in zip(ids, cls_dirs, strict=True) if i != OTHER_ID}

    def sample(files: list[Path], n: int | None) -> list[Path]:
        return files if n is None else [files[i] for i in rng.permutation(len(files))[:n]]

    links: list[tuple[Path, str]] = []
    by_domain: dict[str, list[Path]] = {}
    for cid, files in sorted(crops.items()):
        if cid in folder_of:
            links += [(f, folder_of[cid]) for f in files]
        elif cid == OTHER_ID:
            links += [(f, OTHER_EN) for f in sample(files, max_other)]
        elif per_other_domain is None:
            links += [(f, OTHER_EN) for f in files]
        else:
            by_domain.setdefault(ontology[cid].domain or "", []).extend(files)
    for _, files in sorted(by_domain.items()):
        links += [(f, OTHER_EN) for f in sample(files, per_other_domain)]
    for f, folder in links:
        _link(f, root / "train" / folder / f"scene_{f.name}")
    if batch and links and len(list((root / "train").glob("*/*"))) % batch == 1:
        sorted((root / "train").glob("*/scene_*"))[-1].unlink()


def train_classifier(
    data_dir: Path,
    out_dir: Path,
    model: str = "yolo11n-cls.yaml",
    init: Path | None = None,
    device: str = "auto",
    progress: str | None = "expert",
    **ultralytics_args: Any,
) -> FitResult:
    """Train one ultralytics classifier on a class-folder dataset; ``.best`` is ``out_dir/best.pt``.

    Uses the shared training helper (:func:`wanwu.training.fit`: resume after a kill, progress, MLflow) with
    ultralytics' classification trainer. ``init`` is a detector checkpoint whose backbone initialises the
    classifier where names and shapes match (ultralytics ``pretrained``): the proposer's, trained on the generic
    corpus — a pretrained backbone, as users start from ImageNet weights.
    """
    from ultralytics.models.yolo.classify import ClassificationTrainer

    from wanwu.training import fit

    if init is not None and Path(init).is_file():
        ultralytics_args["pretrained"] = str(init)
    result = fit(
        data_dir,
        out_dir,
        model=model,
        device=device,
        trainer_factory=ClassificationTrainer,
        progress=progress,
        **ultralytics_args,
    )
    return result


# ---- the fused teacher as one object (the serving cascade uses it) -----------------------------------------

TEACHER_FILE = "teacher.json"
"""Written by the autolabel stage under ``data/autolabel/``: teacher specs, fusion, crop context, ontology."""


class FusedTeacher:
    """The autolabel stage's teachers and fusion behind one ``predict_proba(crops)`` → (N, K+1) over ontology
    ids, column K = other: what ``serve.cascade_teacher: wanwu.models.teachers:from_params`` loads."""

    def __init__(self, teachers: list[Teacher], ontology: Ontology, fusion: Any, context: float = CROP_CONTEXT):
        self.teachers = teachers
        self.mappings = [OntologyMapping(t.labels, ontology) for t in teachers]
        self.fusion = fusion
        self.context = context
        self.labels = [*(c.en for c in ontology.classes), OTHER_EN]

    def predict_proba(self, crops: Sequence[Any]) -> np.ndarray:
        return np.asarray(self.fusion(project_all(self.teachers, self.mappings, crops)), np.float32)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> FusedTeacher:
        from wanwu.models.fusion import Fusion, StackedModel

        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"{path}: no fused teacher here. Run `wanwu stage autolabel` first (it writes it).")
        d = json.loads(path.read_text(encoding="utf-8"))
        ontology = Ontology.load(d["ontology"])
        teachers = [build_teacher(t, ontology, device=device) for t in d["teachers"]]
        f = d["fusion"]
        meta = StackedModel.from_dict(f["meta"]) if f.get("meta") else None
        fusion = Fusion(
            f["strategy"], [OntologyMapping(t.labels, ontology).coverage for t in teachers], f.get("weights"), meta
        )
        return cls(teachers, ontology, fusion, float(d.get("crop_context", 1.3)))  # older files: labeled at 1.3


def from_params(params: Any) -> FusedTeacher:
    """``serve.cascade_teacher`` factory: the fused teacher the last autolabel run used."""
    return FusedTeacher.load(Path(params.project.data_dir) / "autolabel" / TEACHER_FILE, device=params.project.device)
