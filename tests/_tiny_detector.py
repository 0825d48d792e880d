"""Tiny real YOLO11n ONNX detectors for the serving tests and bench, built here in seconds, never downloaded.

A YOLO11n built from ``yolo11n.yaml`` with the ontology's 16 classes (names = Chinese names, as the quality
stage's data.yaml has them), exported by ultralytics to ONNX with dynamic shapes. Untrained, it scores every
class near 0, so the classification conv of the coarsest scale is set to say one class with a chosen logit
everywhere: a deterministic detector whose version shows in its labels (v1 says 猫, v2 says 狗) and whose
confidence can sit below a cascade threshold. Variants are the same graph with that one bias changed in the
ONNX file (one ultralytics export per session, not one per variant).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
_HOT_BIAS = re.compile(r"cv3\.(\d+)\.2\.bias$")  # Detect head: per-scale classification conv, last layer


def build_tiny_detector(out_dir: str | Path, *, imgsz: int = 64, seed: int = 0) -> Path:
    """Export the base detector (class 0 at logit 3 on the coarsest scale) once per folder and size."""
    from wanwu.offline import harden

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"tiny-{imgsz}-{seed}.onnx"
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        harden(os.environ.get("WANWU_ROOT", str(ROOT)))
        import torch
        from ultralytics import YOLO
        from ultralytics.nn.tasks import yaml_model_load

        from wanwu.ontology import Ontology

        onto = Ontology.load(ROOT / "ontology.yaml")
        cfg = yaml_model_load("yolo11n.yaml")
        cfg["nc"] = len(onto)
        cfg.pop("yaml_file", None)
        cfg.pop("scale", None)
        work = out_dir / f".tiny-{imgsz}-{seed}"
        work.mkdir(exist_ok=True)
        cfg_path = work / "yolo11n-wanwu.yaml"  # the stem tells ultralytics the scale (n)
        cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        torch.manual_seed(seed)
        model = YOLO(str(cfg_path))
        model.model.names = onto.names_zh
        with torch.no_grad():
            last = model.model.model[-1].cv3[-1][-1]  # classification conv of the coarsest scale
            last.weight.zero_()
            last.bias.fill_(-20.0)
            last.bias[0] = 3.0
        onnx_file = model.export(format="onnx", imgsz=imgsz, dynamic=True, simplify=False)
        os.replace(onnx_file, target)
        return target


def detector_variant(base: str | Path, out: str | Path, *, hot_class: int, hot_logit: float = 3.0) -> Path:
    """A copy of ``base`` that says ``hot_class`` with confidence sigmoid(hot_logit) on its coarsest scale."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(base))
    found = [(int(m.group(1)), init) for init in model.graph.initializer if (m := _HOT_BIAS.search(init.name))]
    _, init = max(found, key=lambda t: t[0])
    bias = np.full(numpy_helper.to_array(init).shape, -20.0, dtype=np.float32)
    bias[hot_class] = hot_logit
    init.CopyFrom(numpy_helper.from_array(bias, init.name))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)  # atomic: a server watching `out` never sees half a file
    return out
