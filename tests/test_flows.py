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
