"""Checks on model files before a library opens them, so a wrong file fails with its name and the fix.

ultralytics answers a file that is not a checkpoint with errors such as ``invalid literal for int()``; a user
needs to hear which file, what it is instead, and what to point the param at.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A model file is missing or is not the kind of file it should be."""


_YAML = (".yaml", ".yml")


def check_model_source(path: str | Path, param: str = "model") -> Path | str:
    """A detector source: an ultralytics yaml name/file (built from scratch) or a PyTorch checkpoint file.

    Returns what to hand to ``ultralytics.YOLO``; raises CheckpointError naming the file, the param and the fix.
    """
    p = Path(path)
    if p.suffix in _YAML:
        if p.is_file() or len(p.parts) == 1:  # a file, or a model name ultralytics ships (yolo11n.yaml)
            return str(path)
        raise CheckpointError(f"{param}: {p} does not exist. Point `{param}` at an existing .yaml or .pt file.")
    if not p.is_file():
        raise CheckpointError(
            f"{param}: {p} does not exist. Point `{param}` at a .pt checkpoint, or at a .yaml (e.g. yolo11n.yaml) "
            "to start from scratch."
        )
    if p.suffix == ".onnx":
        return str(p)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{param}: {p} is empty (0 bytes): a failed copy or download? Replace the file.")
    if not zipfile.is_zipfile(p):
        with p.open("rb") as f:
            head = f.read(16)
        if head.startswith(b"PK"):
            raise CheckpointError(
                f"{param}: {p} is a zip archive cut short (no central directory: a copy or download that stopped "
                "part-way?). Copy the checkpoint again, or point it at another best.pt / last.pt."
            )
        raise CheckpointError(
            f"{param}: {p} is not a PyTorch checkpoint (a .pt file is a zip archive; this one starts with {head!r}). "
            "Point it at a checkpoint written by ultralytics (best.pt / last.pt), or a .yaml to start from scratch."
        )
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(
            f"{param}: {p} is a zip archive but not a PyTorch checkpoint (no data.pkl inside: {names[:3]}…). "
            "Point it at a checkpoint written by ultralytics (best.pt / last.pt), or a .yaml to start from scratch."
        )
    return str(p)


def _what_it_holds(p: Path) -> str:
    """A short description of a PyTorch file's top-level object, read without running pickled code."""
    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # pickled code or a torch version mismatch: the caller's error says enough
        return "pickled objects that are not an ultralytics model"
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = list(obj)[:3]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a state_dict of {len(obj)} tensors ({', '.join(map(repr, keys))}, …), not a whole model"
        return f"a dict with keys {keys} and no ultralytics model under 'model' or 'ema'"
    return f"a {type(obj).__name__}"


def load_ultralytics(
    path: str | Path, param: str = "model", *, task: str | None = None, device: Any = "cpu", fuse: bool = True
) -> tuple[Any, dict]:
    """ultralytics' ``load_checkpoint`` behind :func:`check_model_source`, for code that opens a .pt itself.

    A PyTorch file that is not an ultralytics checkpoint (a bare state_dict, a tensor, another library's model)
    makes ultralytics fail with ``'Tensor' object has no attribute 'model'`` or a bare ``invalid literal for
    int()``; here it fails with the file, the param, what the file holds and the fix. ``task`` (detect,
    classify, …) is checked too.
    """
    from ultralytics.nn.tasks import load_checkpoint

    p = Path(path)
    if p.suffix in _YAML or p.suffix == ".onnx":
        raise CheckpointError(f"{param}: {p} is a {p.suffix} file; this needs a .pt checkpoint written by ultralytics.")
    check_model_source(p, param)
    try:
        model, ckpt = load_checkpoint(p, device=device, fuse=fuse)
    except Exception as e:  # whatever ultralytics raises, the user needs the file and the fix
        first = (str(e).strip().splitlines() or [""])[0].removeprefix("ERROR ❌️ ").split(". ")[0][:160]
        raise CheckpointError(
            f"{param}: {p} is a PyTorch file but not an ultralytics checkpoint: it holds {_what_it_holds(p)} "
            f"(ultralytics: {type(e).__name__}: {first}). Point `{param}` at best.pt / last.pt written by "
            "ultralytics training (model.save() or a finished run's weights/)."
        ) from e
    got = getattr(model, "task", None)
    if task is not None and got != task:
        raise CheckpointError(
            f"{param}: {p} is a {got} checkpoint, not a {task} one. Point `{param}` at a {task} checkpoint."
        )
    return model, ckpt
