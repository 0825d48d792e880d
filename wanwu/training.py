"""ultralytics training, shared by the proposer (autolabel), the train stage and the distill stage.

Arguments use ultralytics' own names and pass straight through; this module only fixes where outputs go and
which device is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``0`` (first GPU) when CUDA is there, else ``cpu``; anything else passes through."""
    if device != "auto":
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def train_detector(
    data_yaml: str | Path,
    out_dir: str | Path,
    model: str | Path = "yolo11n.yaml",
    device: str = "auto",
    **ultralytics_args: Any,
) -> Path:
    """Train an ultralytics detector on ``data_yaml``; return ``out_dir/best.pt``.

    ``model`` is a yaml (from scratch) or a checkpoint (fine-tune). Runs go to ``out_dir/run`` and the best
    weights are copied to ``out_dir/best.pt`` so later stages find them in one place.
    """
    from ultralytics import YOLO

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args = {"workers": 0, "plots": False, "verbose": False, "exist_ok": True, **ultralytics_args}
    yolo = YOLO(str(model))
    yolo.train(data=str(data_yaml), project=str(out_dir), name="run", device=resolve_device(device), **args)
    best = Path(yolo.trainer.best)
    if not best.is_file():
        best = Path(yolo.trainer.last)
    target = out_dir / "best.pt"
    shutil.copyfile(best, target)
    return target
