"""The evaluate stage on a real trained model: every candidate on the same gold set, Chinese names in the figures."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
from _shapes import make_project, mlflow_store

from wanwu.config import EvaluateParams, ProjectParams

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path_factory, monkeypatch):
    """The session's MLflow store (shared with the registry tests: creating one takes seconds)."""
    import mlflow

    uri = mlflow_store(tmp_path_factory.getbasetemp() / "mlflow-store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.mark.slow
def test_evaluate_stage_measures_every_candidate_on_the_gold_set(tmp_path, shapes_checkpoints, store, monkeypatch):
    from tasks import evaluate

    ckpts = shapes_checkpoints

    monkeypatch.setenv("WANWU_MODEL_NAME", "evaluate-detector")  # no champion under this name
    root = make_project(
        tmp_path, ckpts["data"], {"train": ckpts["good"], "distill": ckpts["best"]}, REPO / "ontology.yaml"
    )
    project = ProjectParams(data_dir=root / "data", ontology=REPO / "ontology.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate.run(EvaluateParams(latency_runs=5, latency_warmup=1), project)

    metrics = json.loads(Path(result.metrics_file).read_text(encoding="utf-8"))
    assert metrics["gold"]["split"] == "test" and metrics["gold"]["images"] == 16 and metrics["gold"]["imgsz"] == 64
    assert set(metrics["models"]) == {"train", "distill"} and metrics["champion_version"] is None
    for m in metrics["models"].values():
        assert 0 <= m["mAP50-95"] <= m["mAP50"] <= 1
        assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"]
        assert set(m["per_class"]) <= {"猫", "狗", "鸟"} and m["per_class"]
        cat = m["per_class"].get("猫") or next(iter(m["per_class"].values()))
        assert cat["name_en"] in {"cat", "dog", "bird"} and 0 <= cat["recall"] <= 1 and cat["instances"] > 0
    # the longer-trained checkpoint is the better one, and the stage says so
    assert metrics["models"]["distill"]["mAP50-95"] > metrics["models"]["train"]["mAP50-95"]
    assert result.best == "distill" and result.best_weights.endswith("distill/best.pt")

    plots = root / "data" / "evaluate" / "plots"
    for name in ("train", "distill"):
        assert (plots / name / "confusion_matrix_normalized.png").stat().st_size > 10_000
    rows = list(csv.DictReader((plots.parent / "per_class.csv").read_text(encoding="utf-8").splitlines()))
    assert {r["class"] for r in rows} <= {"猫", "狗", "鸟"} and {r["model"] for r in rows} == {"distill"}
    # matplotlib warns "Glyph … missing from font" when Chinese would be drawn as empty boxes
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing[:3]


def test_best_candidate_ignores_the_champion():
    from wanwu.evaluation import best_candidate

    models = {"train": {"mAP50-95": 0.3}, "distill": {"mAP50-95": 0.4}, "champion": {"mAP50-95": 0.9}}
    assert best_candidate(models) == "distill"
    assert best_candidate({"train": {"mAP50-95": 0.3}, "distill": {"mAP50-95": 0.3}}) == "train"  # first on a tie
    assert best_candidate({"champion": {"mAP50-95": 0.9}}) is None


def test_missing_inputs_say_which_stage_writes_them(tmp_path):
    from tasks import evaluate
    from wanwu.evaluation import EvaluationError, evaluate_model

    with pytest.raises(evaluate.StageInputMissing, match="wanwu stage quality"):
        evaluate.run(EvaluateParams(), ProjectParams(data_dir=tmp_path / "data", ontology=REPO / "ontology.yaml"))
    with pytest.raises(EvaluationError, match="weights not found"):
        evaluate_model(tmp_path / "nope.pt", tmp_path / "data.yaml")


@pytest.mark.parametrize(
    ("train_imgsz", "scale", "expected"),
    [(256, 1.125, 288), (320, 1.125, 352), (64, 1.125, 64), (640, 1.0, 640), (320, 1.3, 416), (20, 1.0, 32)],
)
def test_inference_size_is_the_training_size_scaled_to_the_stride(train_imgsz, scale, expected):
    from wanwu.evaluation import inference_imgsz

    # ultralytics rounds a misaligned size up (320 × 1.125 = 360 would run at 384); ours goes to the nearest
    assert inference_imgsz(train_imgsz, scale) == expected


@pytest.mark.slow
def test_the_run_report_draws_the_evaluated_best_model_at_the_evaluated_size(tmp_path, shapes_checkpoints, monkeypatch):
    """The report's example detections are the model the evaluation chose (train here, though distill exists) at the
    size it was measured at, not the first checkpoint found at its training size."""
    from ultralytics import YOLO

    from wanwu import run_report

    ckpts = shapes_checkpoints
    root = make_project(
        tmp_path, ckpts["data"], {"train": ckpts["best"], "distill": ckpts["weak"]}, REPO / "ontology.yaml"
    )
    data = root / "data"
    (data / "evaluate").mkdir()
    metrics = {
        "gold": {"imgsz": 96},
        "best": "train",
        "models": {"train": {"weights": str(data / "train" / "best.pt")}, "distill": {"weights": "x"}},
    }
    (data / "evaluate" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    sizes = []
    predict = YOLO.predict

    def spy(self, *args, **kwargs):
        sizes.append(kwargs.get("imgsz"))
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(YOLO, "predict", spy)
    section = run_report._detections(data, tmp_path / "report", n=2)
    assert [caption.split(" ")[0] for _, caption in section.figures] == ["train", "train"]
    assert sizes == [96, 96] and all(path.stat().st_size > 1_000 for path, _ in section.figures)

    (data / "evaluate" / "metrics.json").unlink()  # before an evaluation: distill's checkpoint, its own size
    section = run_report._detections(data, tmp_path / "report", n=1)
    assert section.figures[0][1].startswith("distill") and sizes[-1] is None
