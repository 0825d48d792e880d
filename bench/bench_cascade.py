"""The serving cascade on the pipeline's own gold set: accuracy gain and latency cost against the detector alone.

Needs a finished pipeline run (data/export/model.onnx and data/autolabel/teacher.json); without one the row says so.
Run: `python -m bench cascade` after `make run`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_dir: Path, data_dir: Path = ROOT / "data", threshold: float = 0.5) -> list[dict]:
    from wanwu.config import load_params
    from wanwu.models.teachers import from_params
    from wanwu.onnx_model import OnnxDetector
    from wanwu.ontology import Ontology
    from wanwu.serve import gold_samples, measure_cascade

    onnx = data_dir / "export" / "model.onnx"
    if not onnx.is_file() or not (data_dir / "autolabel" / "teacher.json").is_file():
        return [{"name": "serve cascade on the gold set", "value": None, "unit": "", "goal": "run `make run` first"}]
    params = load_params(ROOT / "params.yaml")
    m = measure_cascade(
        OnnxDetector(onnx),
        from_params(params),
        Ontology.load(params.project.ontology),
        gold_samples(data_dir),
        threshold=threshold,
    )
    return [
        {
            "name": f"cascade label accuracy on gold ({m['matched_boxes']} matched boxes, threshold {threshold})",
            "value": m["label_accuracy_cascade"],
            "unit": "accuracy",
            "baseline": "detector alone",
            "baseline_value": m["label_accuracy_detector"],
            "ratio": m["label_accuracy_cascade"] / max(m["label_accuracy_detector"], 1e-9),
            "goal": "measured (off by default)",
        },
        {
            "name": "cascade mAP50 on gold",
            "value": m["map50_cascade"],
            "unit": "mAP50",
            "baseline": "detector alone",
            "baseline_value": m["map50_detector"],
            "ratio": m["map50_cascade"] / max(m["map50_detector"], 1e-9),
            "goal": "measured",
        },
        {
            "name": "cascade latency per image",
            "value": m["ms_per_image_cascade"],
            "unit": "ms",
            "baseline": "detector alone",
            "baseline_value": m["ms_per_image_detector"],
            "ratio": m["ms_per_image_cascade"] / max(m["ms_per_image_detector"], 1e-9),
            "goal": "measured",
        },
    ]


if __name__ == "__main__":
    import tempfile

    for row in bench(Path(tempfile.mkdtemp())):
        print(row)
