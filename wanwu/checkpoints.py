"""Checks on model files before a library opens them, so a wrong file fails with its name and the fix.

ultralytics answers a file that is not a checkpoint with errors such as ``invalid literal for int()``; a user
needs to hear which file, what it is instead, and what to point the param at.
"""

from __future__ import annotations

import zipfile
from pathlib import Path


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
        raise CheckpointError(
            f"{param}: {p} is not a PyTorch checkpoint (a .pt file is a zip archive; this one starts with {head!r}). "
            "Point it at a checkpoint written by ultralytics (best.pt / last.pt), or a .yaml to start from scratch."
        )
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(
            f"{param}: {p} is a zip archive but not a PyTorch checkpoint (no data.pkl inside: {names[:3]}…)."
        )
    return str(p)
