"""The registry on real state: MLflow on SQLite in a temp folder, real models trained here, real evaluations.

The scenario (issue 6): v1 promoted; a worse v2 refused with its reason; a better v3 promoted; v3 regresses on
newly labeled data from another distribution and the champion rolls back by itself; the history lists the four
decisions; a fresh process loads ``models:/wanwu-detector@champion`` and labels an image in Chinese. Plus: two
promotions at once leave one champion, and an incomplete version never gets an alias.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _shapes import make_project, mlflow_store

from wanwu.config import EvaluateParams, ExportParams, ProjectParams, PromoteParams

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Gate thresholds for a world where a 60-epoch YOLO11n reaches mAP50-95 ≈ 0.7: the floors keep an untrained model
# out; latency is generous because the machine is shared.
GATE = PromoteParams(
    min_improvement=0.01,
    max_recall_drop=0.5,
    latency_budget_ms=5000,
    floor_map50=0.3,
    floor_map50_95=0.1,
    rollback_tolerance=0.05,
)
EVAL = EvaluateParams(latency_runs=3, latency_warmup=1, plots=False, batch=16)
# onnxslim costs seconds per export: test_export covers simplify=True
EXPORT = ExportParams(int8=False, simplify=False, parity_images=4, latency_runs=3, latency_warmup=1, conf=0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory, shapes_checkpoints):
    base = tmp_path_factory.getbasetemp()
    ckpts = shapes_checkpoints
    uri = mlflow_store(base / "mlflow-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("WANWU_ARTIFACT_ROOT", (base / "mlflow-store" / "mlartifacts").as_uri())
        import mlflow

        mlflow.set_tracking_uri(uri)
        yield {"ckpts": ckpts, "uri": uri, "base": base}


def _project(tmp_path: Path, world, weights: Path) -> ProjectParams:
    root = make_project(tmp_path / "proj", world["ckpts"]["data"], {"train": weights}, REPO / "ontology.yaml")
    return ProjectParams(data_dir=root / "data", ontology=REPO / "ontology.yaml")


def _cycle(project: ProjectParams, weights: Path):
    """evaluate → export → promote, the stages' own code, with ``weights`` as the train stage's output."""
    import shutil

    from tasks import evaluate, export, promote

    shutil.copyfile(weights, Path(project.data_dir) / "train" / "best.pt")
    import time as _t

    t0 = _t.time()
    ev = evaluate.run(EVAL, project)
    print("TIMING evaluate", _t.time() - t0)
    t0 = _t.time()
    ex = export.run(EXPORT, project)
    print("TIMING export", _t.time() - t0)
    return ev, ex, lambda: promote.run(GATE, project)


def test_scenario_promote_refuse_promote_rollback(tmp_path, world, monkeypatch):
    from typer.testing import CliRunner

    from wanwu import registry
    from wanwu.cli import app
    from wanwu.evaluation import MAP

    monkeypatch.setenv("WANWU_MODEL_NAME", "wanwu-detector")
    ck = world["ckpts"]
    project = _project(tmp_path, world, ck["good"])

    # v1: the first model, judged against the absolute floors
    ev1, ex1, promote1 = _cycle(project, ck["good"])
    assert ex1.version == "1" and ex1.parity["passed"]
    r1 = promote1()
    assert (r1.decision, r1.champion) == ("promoted", "1")
    assert r1.canary is not None and r1.canary["passed"], r1.canary

    v1 = registry.get_version("1")
    assert v1.tags["wanwu.complete"] == "true"
    assert v1.tags["wanwu.data_version"].startswith(("dvc:", "sha256:"))
    assert v1.tags["wanwu.git_commit"]
    assert json.loads(v1.tags["wanwu.metrics"])[MAP] == ev1.summary["train"][MAP]

    # v2: a worse model (an earlier checkpoint of the same run), refused with its figures
    ev2, _ex2, promote2 = _cycle(project, ck["weak"])
    assert ev2.champion_version == "1" and ev2.summary["train"][MAP] < ev2.summary["champion"][MAP]
    with pytest.raises(registry.PromotionRefused) as refused:
        promote2()
    assert "beats champion" in str(refused.value) and "promote.min_improvement" in str(refused.value)
    beats = next(c for c in refused.value.decision.checks if c.name == "beats champion")
    assert not beats.passed and beats.figure == ev2.summary["train"][MAP]
    assert beats.threshold == pytest.approx(ev2.summary["champion"][MAP] + GATE.min_improvement)
    decision = json.loads((Path(project.data_dir) / "promote" / "decision.json").read_text())
    assert decision["decision"] == "refused" and decision["champion_after"] == "1"
    assert registry.get_alias(registry.CHAMPION).version == "1"
    assert registry.get_version("2").tags["wanwu.decision"] == "refused"

    # v3: better than v1 by more than the margin, promoted; v1 becomes previous
    ev3, _ex3, promote3 = _cycle(project, ck["best"])
    assert ev3.summary["train"][MAP] >= ev3.summary["champion"][MAP] + GATE.min_improvement, ev3.summary
    r3 = promote3()
    assert (r3.decision, r3.champion) == ("promoted", "3")
    assert registry.get_alias(registry.PREVIOUS).version == "1"

    # newly labeled data from another distribution: v3 regresses and the champion rolls back by itself
    hc = registry.check_and_rollback(ck["shifted"], GATE, imgsz=64, context="new data")
    assert hc is not None and not hc.passed and hc.version == "3"
    assert hc.figure < (1 - GATE.rollback_tolerance) * hc.recorded
    assert hc.rollback is not None and hc.rollback.decision == "rolled_back"
    assert registry.get_alias(registry.CHAMPION).version == "1"
    assert registry.get_alias(registry.PREVIOUS) is None  # v1 replaced nothing: the chain ends there

    rows = registry.history()
    assert [(r["decision"], r["version"]) for r in rows] == [
        ("promoted", "1"),
        ("refused", "2"),
        ("promoted", "3"),
        ("rolled_back", "3"),
    ]
    assert "new data" in rows[3]["reason"] and rows[1]["figures"]["candidate_mAP50_95"] == ev2.summary["train"][MAP]

    runner = CliRunner()
    params_file = str(Path(project.data_dir).parent / "params.yaml")
    out = runner.invoke(app, ["history", "-p", params_file], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    for word in ("promoted", "refused", "rolled_back", "champion 1"):
        assert word in out.output
    # nothing older than v1 to return to: a manual rollback says so and changes nothing
    out = runner.invoke(app, ["rollback", "-p", params_file, "--reason", "test"])
    assert out.exit_code == 1 and "no 'previous' version" in out.output
    assert registry.get_alias(registry.CHAMPION).version == "1"

    # a fresh process, without the wanwu package importable, loads the champion and labels a gold image
    image = sorted((Path(project.data_dir) / "quality" / "dataset" / "images" / "test").glob("*.jpg"))[0]
    code = textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "wanwu" or name.startswith("wanwu."):
                    raise ImportError("wanwu is blocked in this process")
        sys.meta_path.insert(0, _Block())
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model("models:/wanwu-detector@champion")
        out = model.predict(pd.DataFrame({{"image": [{str(image)!r}]}}), params={{"conf": 0.05}})
        print(out.to_json(orient="records", force_ascii=False))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"], "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    boxes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert boxes, "the champion found nothing on a gold image"
    assert {b["name_zh"] for b in boxes} <= {"猫", "狗", "鸟"} and {b["name_en"] for b in boxes} <= {
        "cat",
        "dog",
        "bird",
    }
    assert all(0 <= b["x1"] < b["x2"] <= 64 and 0 < b["confidence"] <= 1 for b in boxes)


def _register(weights: Path, metrics: dict, tmp: Path, root: Path):
    from wanwu import export as ex
    from wanwu import registry, tracking

    onnx_path, pt = ex.export_onnx(weights, tmp, 64, simplify=False)
    labels = ex.labels_for(pt, 64, REPO / "ontology.yaml")
    with tracking.stage_run("export", root):
        return registry.log_and_register(onnx_path, pt, labels, metrics)


def _other_bytes(weights: Path, out: Path) -> Path:
    """The same model saved again with another date: two candidates that are not byte-identical."""
    import torch

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)  # a checkpoint this test session trained
    ckpt["date"] = "re-saved"
    torch.save(ckpt, out)
    return out


def test_a_re_export_of_the_champions_weights_is_unchanged_not_refused(tmp_path, world, monkeypatch):
    """export re-runs when its code changes; the same weights registered again must not fail the gate."""
    from wanwu import registry
    from wanwu.evaluation import evaluate_model

    monkeypatch.setenv("WANWU_MODEL_NAME", "reexport-detector")
    ck = world["ckpts"]
    good = evaluate_model(ck["good"], ck["data"], imgsz=64, latency_runs=2, latency_warmup=0)
    v1 = _register(ck["good"], good, tmp_path / "a", tmp_path)
    assert registry.promote(v1.version, GATE).decision == "promoted"
    v2 = _register(ck["good"], good, tmp_path / "b", tmp_path)  # same weights, new version
    d = registry.promote(v2.version, GATE)
    assert (d.decision, d.champion_after) == ("unchanged", v1.version)
    assert "holds the champion's weights" in d.reason
    assert registry.get_alias(registry.CHAMPION).version == v1.version
    assert [r["version"] for r in registry.history()] == [v1.version]
    v3 = _register(ck["weak"], good, tmp_path / "c", tmp_path)
    with pytest.raises(registry.PromotionRefused):  # other weights are gated as before
        registry.promote(v3.version, GATE)


_PROMOTER = """
import os, sys, time
from pathlib import Path
from wanwu import registry
from wanwu.config import PromoteParams
import json
champion = json.loads(os.environ["CHAMPION_METRICS"])
registry.get_alias(registry.CHAMPION)  # mlflow imported and the store open before the start line
Path(sys.argv[2]).write_text("ready")
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
try:
    d = registry.promote(sys.argv[1], PromoteParams(**json.loads(os.environ["GATE"])),
                         champion_metrics=champion, champion_version="1")
    print("PROMOTED", d.version)
except registry.PromotionRefused as e:
    print("REFUSED", e.decision.version, e.decision.reason)
    sys.exit(3)
"""


def test_two_promotions_at_once_leave_exactly_one_champion(tmp_path, world, monkeypatch):
    from wanwu import registry
    from wanwu.evaluation import evaluate_model

    monkeypatch.setenv("WANWU_MODEL_NAME", "race-detector")
    ck = world["ckpts"]
    good = evaluate_model(ck["good"], ck["data"], imgsz=64, latency_runs=2, latency_warmup=0)
    best = evaluate_model(ck["best"], ck["data"], imgsz=64, latency_runs=2, latency_warmup=0)
    v1 = _register(ck["good"], good, tmp_path / "a", tmp_path)
    va = _register(ck["best"], best, tmp_path / "b", tmp_path)
    vb = _register(_other_bytes(ck["best"], tmp_path / "best-copy.pt"), best, tmp_path / "c", tmp_path)
    registry.promote(v1.version, GATE)

    env = {**os.environ, "CHAMPION_METRICS": json.dumps(good), "GATE": GATE.model_dump_json()}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROMOTER, v.version, str(tmp_path / f"ready{v.version}"), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in (va, vb)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{v.version}").exists() for v in (va, vb)) and time.time() < deadline:
        time.sleep(0.05)
    go.write_text("go")  # both processes are past their imports: they promote at the same moment
    results = [(*p.communicate(timeout=180), p.returncode) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 3], results
    winner = next(r[0].split()[1] for r in results if r[2] == 0)
    loser_out = next(r[0] for r in results if r[2] == 3)
    assert "champion moved" in loser_out  # judged against the new champion, not the stale one

    assert registry.get_alias(registry.CHAMPION).version == winner
    assert registry.get_alias(registry.PREVIOUS).version == v1.version
    decisions = [(r["decision"], r["version"]) for r in registry.history()]
    assert decisions[0] == ("promoted", v1.version)
    assert sorted(decisions[1:]) == sorted(
        [("promoted", winner), ("refused", ({va.version, vb.version} - {winner}).pop())]
    )

    # by hand: back to v1, recorded as a manual rollback with its reason
    d = registry.rollback("operator: latency complaints")
    assert (d.decision, d.champion_before, d.champion_after) == ("manual_rollback", winner, v1.version)
    assert registry.get_alias(registry.CHAMPION).version == v1.version and registry.get_alias(registry.PREVIOUS) is None
    assert registry.history()[-1]["reason"] == "operator: latency complaints"


def test_incomplete_version_never_gets_an_alias(tmp_path, world, monkeypatch):
    from mlflow import MlflowClient

    from wanwu import registry
    from wanwu.evaluation import evaluate_model

    monkeypatch.setenv("WANWU_MODEL_NAME", "integrity-detector")
    ck = world["ckpts"]
    metrics = evaluate_model(ck["good"], ck["data"], imgsz=64, latency_runs=2, latency_warmup=0)
    mv = _register(ck["good"], metrics, tmp_path / "x", tmp_path)
    params = GATE
    client = MlflowClient()

    # an export that died before its last step: no completion tag
    client.delete_model_version_tag("integrity-detector", mv.version, "wanwu.complete")
    with pytest.raises(registry.PromotionRefused, match="never finished"):
        registry.promote(mv.version, params)
    assert registry.get_alias(registry.CHAMPION) is None

    # a complete-looking version whose ONNX file vanished from the artifact store
    client.set_model_version_tag("integrity-detector", mv.version, "wanwu.complete", "true")
    store = Path(world["base"] / "mlflow-store" / "mlartifacts")
    source = client.get_model_version_download_uri("integrity-detector", mv.version)
    target = Path(source.removeprefix("file://")) / "artifacts" / "model.onnx"
    assert target.is_file(), (source, sorted(store.rglob("model.onnx"))[:3])
    saved = target.read_bytes()
    target.unlink()
    with pytest.raises(registry.PromotionRefused, match="artifacts/model.onnx is missing"):
        registry.promote(mv.version, params)
    assert registry.get_alias(registry.CHAMPION) is None

    target.write_bytes(saved)  # restored: now it may serve
    assert registry.promote(mv.version, params).decision == "promoted"
    assert registry.get_alias(registry.CHAMPION).version == mv.version
    assert [r["decision"] for r in registry.history()] == ["refused", "refused", "promoted"]
