"""The export stage on a real trained model: ONNX that reloads and agrees with PyTorch, the INT8 decision recorded
either way, and a registered version carrying its metrics, data version and git commit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _shapes import make_project, mlflow_store

from wanwu.config import EvaluateParams, ExportParams, ProjectParams

REPO = Path(__file__).resolve().parents[1]
EXPORT = ExportParams(
    imgsz=64,
    dynamic=True,
    simplify=True,
    opset=18,
    parity_images=6,
    int8=True,
    int8_calibration_images=16,
    latency_runs=20,
    latency_warmup=3,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shapes_checkpoints):
    """evaluate → export on a project that is a git repository (so the commit tag is checkable)."""
    from tasks import evaluate, export

    base = tmp_path_factory.getbasetemp()
    ckpts = shapes_checkpoints
    uri = mlflow_store(base / "mlflow-store")
    root = make_project(
        tmp_path_factory.mktemp("export-proj"), ckpts["data"], {"train": ckpts["best"]}, REPO / "ontology.yaml"
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "params"], cwd=root, check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("WANWU_MODEL_NAME", "export-detector")
        import mlflow

        mlflow.set_tracking_uri(uri)
        project = ProjectParams(data_dir=root / "data", ontology=REPO / "ontology.yaml")
        evaluate.run(EvaluateParams(latency_runs=3, latency_warmup=1, plots=False), project)
        result = export.run(EXPORT, project)
        yield {"root": root, "result": result, "ckpts": ckpts}


@pytest.mark.slow
def test_onnx_reloads_agrees_with_pytorch_and_takes_any_batch(exported):
    import onnxruntime as ort

    from wanwu.pyfunc import letterbox

    r = exported["result"]
    parity = json.loads(Path(r.parity_file).read_text())
    assert parity["passed"] and parity["images"] == 6
    assert parity["max_abs_diff"] <= EXPORT.parity_max_abs_diff
    assert parity["box_agreement"] >= EXPORT.parity_min_agreement and parity["boxes_torch"] > 0
    session = ort.InferenceSession(r.onnx, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch, as export.dynamic asks
    images = sorted((exported["root"] / "data" / "quality" / "dataset" / "images" / "test").glob("*.jpg"))[:3]
    batch = np.concatenate([letterbox(p, 64)[0] for p in images])
    out = session.run(None, {"images": batch})[0]
    assert out.shape[0] == 3 and out.shape[1] == 4 + 3


@pytest.mark.slow
def test_int8_decision_is_recorded_with_its_figures(exported):
    r = exported["result"]
    int8 = json.loads((Path(r.onnx).parent / "int8.json").read_text())
    assert int8["tried"] and int8["calibration_images"] == 16
    fp32, i8 = int8["fp32"], int8["int8"]
    for side in (fp32, i8):
        assert 0 <= side["mAP50-95"] <= side["mAP50"] <= 1 and 0 < side["latency_ms_p50"] <= side["latency_ms_p95"]
    assert int8["map50_95_drop"] == pytest.approx(fp32["mAP50-95"] - i8["mAP50-95"], abs=1e-4)
    should_keep = int8["speedup_p50"] >= EXPORT.int8_min_speedup and int8["map50_95_drop"] <= EXPORT.int8_max_map_drop
    assert int8["kept"] == should_keep, int8
    assert Path(r.served_onnx).name == ("model.int8.onnx" if int8["kept"] else "model.onnx")


@pytest.mark.slow
def test_registered_version_carries_metrics_data_version_and_commit(exported, monkeypatch):
    from wanwu import registry

    monkeypatch.setenv("WANWU_MODEL_NAME", "export-detector")
    r, root = exported["result"], exported["root"]
    assert r.model_name == "export-detector" and r.version
    mv = registry.get_version(r.version)
    tags = mv.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert tags["wanwu.git_commit"].removesuffix("-dirty") == head
    assert tags["wanwu.data_version"] == registry.data_version(root / "data" / "quality" / "dataset", root)
    evaluated = json.loads((root / "data" / "evaluate" / "metrics.json").read_text())["models"]["train"]
    metrics = json.loads(tags["wanwu.metrics"])
    assert metrics["mAP50-95"] == evaluated["mAP50-95"] and metrics["per_class"] == evaluated["per_class"]
    assert tags["wanwu.complete"] == "true" and tags["wanwu.precision"] in {"fp32", "int8"}
    assert registry.verify_version(mv) == []
    import mlflow

    raw = mlflow.onnx.load_model(tags["wanwu.onnx_model_uri"])  # the onnx flavour, logged beside the pyfunc
    assert raw.graph.input[0].name == "images"
    assert json.loads((root / "data" / "export" / "registered.json").read_text())["version"] == r.version


@pytest.mark.slow
def test_parity_catches_an_onnx_file_of_another_model(exported):
    from wanwu import export as ex

    r, ck = exported["result"], exported["ckpts"]
    images = sorted((exported["root"] / "data" / "quality" / "dataset" / "images" / "test").glob("*.jpg"))[:6]
    report = ex.parity(ck["weak"], r.onnx, images, 64)  # the ONNX of the best checkpoint vs an earlier one
    assert not report["passed"] and report["max_abs_diff"] > 0.01
    with pytest.raises(ex.ExportError, match="does not match PyTorch"):
        ex.check_parity(report, r.onnx)


def test_int8_decision_rule():
    from wanwu.export import int8_decision

    fp32 = {"mAP50": 0.8, "mAP50-95": 0.6, "latency_ms_p50": 10.0}
    fast_ok = int8_decision(
        fp32, {**fp32, "mAP50-95": 0.595, "latency_ms_p50": 6.0}, max_map_drop=0.01, min_speedup=1.05
    )
    assert fast_ok["kept"] and fast_ok["speedup_p50"] == pytest.approx(10 / 6, abs=1e-3)
    slow = int8_decision(fp32, {**fp32, "latency_ms_p50": 9.9}, max_map_drop=0.01, min_speedup=1.05)
    assert not slow["kept"] and "not faster" in slow["reason"]
    lossy = int8_decision(fp32, {**fp32, "mAP50-95": 0.58, "latency_ms_p50": 5.0}, max_map_drop=0.01, min_speedup=1.05)
    assert not lossy["kept"] and "drops 2.00 points" in lossy["reason"]


def test_data_version_prefers_the_dvc_hash(tmp_path):
    from wanwu.registry import data_version

    ds = tmp_path / "data" / "quality" / "dataset"
    ds.mkdir(parents=True)
    (ds / "data.yaml").write_text("names: {0: 猫}\n", encoding="utf-8")
    content = data_version(ds, tmp_path)
    assert content.startswith("sha256:") and content == data_version(ds, tmp_path)
    (ds / "data.yaml").write_text("names: {0: 狗}\n", encoding="utf-8")
    assert data_version(ds, tmp_path) != content
    # the layout `dvc repro` writes: the quality stage's outs with their md5
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  quality:\n    cmd: wanwu stage quality\n    outs:\n"
        "    - path: data/quality\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
        "      size: 10\n      nfiles: 1\n",
        encoding="utf-8",
    )
    assert data_version(ds, tmp_path) == "dvc:0123456789abcdef0123456789abcdef.dir:dataset"
