"""Flows on Prefect's own test harness: retrain is a clean no-op when nothing is new; monitor with no champion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = "sample://?n=10&seed=5&catalogue_train=1&catalogue_val=1&generic_train=1&generic_val=1"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["project"]["data_dir"] = str(tmp_path / "data")
    params["project"]["ontology"] = str(REPO / "ontology.yaml")
    params["collect"]["sources"] = [{"uri": TINY}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_retrain_is_a_clean_no_op_when_nothing_is_new(harness, project: Path, capsys):
    from flows.retrain import retrain
    from tasks.collect import run as collect
    from wanwu.config import load_params

    p = load_params(project / "params.yaml")
    first = collect(p.collect, p.project)
    assert first.images_added == 10

    state = retrain(params_path=str(project / "params.yaml"), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["retrained"] is False
    assert result["collect"].images_added == 0 and result["collect"].images_total == 10
    assert "nothing new" in capsys.readouterr().out
    assert not (project / "data" / "autolabel").exists()  # no labeling, no training started


def test_monitor_without_a_champion_says_so(harness, project: Path, capsys):
    from flows.monitor import monitor

    state = monitor(params_path=str(project / "params.yaml"), return_state=True)
    assert state.is_completed() and state.result() is None
    assert "no champion registered yet" in capsys.readouterr().out


def test_a_run_that_stops_still_shows_what_ran_and_where_its_report_is(harness, project: Path, capsys):
    """A stage that fails (here promote, with nothing evaluated) ends the flow failed, after the timings of what
    finished and the run report's path are printed: a refused promotion is the usual end of a retrain."""
    from flows.pipeline import pipeline
    from tasks.promote import StageInputMissing

    with pytest.raises(StageInputMissing, match="wanwu stage"):
        pipeline(params_path=str(project / "params.yaml"), stages=["collect", "promote"])
    out = capsys.readouterr().out
    assert "wanwu pipeline" in out and "collect" in out and "total" in out  # the timings table
    report = next(line for line in out.splitlines() if line.startswith("run report: ")).split(": ", 1)[1]
    assert Path(report).is_file()


def test_wanwu_run_ends_a_refused_promotion_with_its_reason_and_exit_3(project: Path, monkeypatch):
    """The gate's refusal is a decision, not a crash: `wanwu run` prints its reason (no traceback) and exits 3, as
    `wanwu stage promote` does, so a scheduler tells it apart from a failure (1)."""
    from typer.testing import CliRunner

    import flows.pipeline
    from wanwu.cli import app
    from wanwu.registry import Check, Decision, PromotionRefused

    beats = Check("beats champion", False, 0.58, 0.59, "mAP50-95 0.58 vs champion 0.58 + margin 0.01", "improve it")
    decision = Decision("refused", "wanwu-detector", "2", "1", "1", "gate", checks=[beats])

    def refused(**_):
        raise PromotionRefused(decision)

    monkeypatch.setattr(flows.pipeline, "pipeline", refused)
    out = CliRunner().invoke(app, ["run", "-p", str(project / "params.yaml")])
    assert out.exit_code == 3, out.output
    assert "version 2 refused; champion stays version 1" in out.output and "beats champion" in out.output
    assert "Traceback" not in out.output
