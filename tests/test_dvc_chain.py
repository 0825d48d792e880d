"""The whole DVC chain at a tiny size: `dvc repro` from clean runs all eight stages, a second does nothing, a
param change re-runs only what is downstream of it, and a sweep queued with `dvc exp run --queue` over a
learning rate × image size grid (the distill stage's) runs and `dvc exp show` ranks it by the gold-set metric.

A real DVC project in a temp git repo holding a copy of this project's sources and dvc.yaml; the stages train
real ultralytics models at imgsz 64 for one epoch, on a 12-scene sample world.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import pytest
import yaml
from _dvc import make_project, set_params
from _dvc import ran as _ran
from _dvc import sh as _sh

TINY = "sample://?n=14&seed=2&size=96&catalogue_train=2&catalogue_val=1&generic_train=3&generic_val=1"
STAGES = ["collect", "autolabel", "quality", "train", "distill", "evaluate", "export", "promote"]
METRIC = "data/evaluate/metrics.json:best_mAP50-95"

pytestmark = pytest.mark.slow

TINY_PARAMS = {
    "collect.workers": 1,
    "autolabel.proposer_train.epochs": 1,
    "autolabel.proposer_train.imgsz": 64,
    "autolabel.proposer_train.generic_train": 3,
    "autolabel.proposer_train.generic_val": 1,
    "autolabel.experts.epochs": 1,
    "autolabel.experts.imgsz": 32,
    "autolabel.experts.single_baseline": False,
    "autolabel.experts.generic_other": 4,
    "autolabel.experts.other_from_domains": 2,
    "autolabel.fusion.other_crops": 10,
    "autolabel.workers": 1,
    "quality.min_images_per_class": 0,
    "quality.max_class_imbalance": 10000,
    "quality.max_background_share": 1.0,
    "quality.include_needs_review": True,
    "quality.min_auto_confidence": 0.0,  # one-epoch teachers are never that sure
    "train.epochs": 1,
    "train.imgsz": 64,
    "train.batch": 4,
    "train.nbs": 4,
    "train.warmup_epochs": 0.0,
    "train.close_mosaic": 0,
    "distill.epochs": 1,
    "distill.imgsz": 64,
    "distill.batch": 4,
    "distill.nbs": 4,
    "distill.warmup_epochs": 0.0,
    "distill.close_mosaic": 0,
    "evaluate.latency_runs": 2,
    "evaluate.latency_warmup": 1,
    "evaluate.plots": False,
    "export.parity_images": 2,
    "export.parity_min_agreement": 0.0,  # an untrained model's boxes are noise at the parity threshold
    "export.int8": False,
    "export.latency_runs": 2,
    "export.latency_warmup": 1,
    "promote.floor_map50": 0.0,
    "promote.floor_map50_95": 0.0,
    "promote.latency_budget_ms": 100000.0,
    "promote.canary": False,
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("chain") / "proj", {"collect.sources": [{"uri": TINY}], **TINY_PARAMS})


def test_repro_runs_the_whole_chain_then_nothing_then_only_downstream_of_a_change(chain: Path):
    first = _sh("dvc repro", chain)
    assert _ran(first) == STAGES, first.stdout[-3000:]
    metrics = json.loads((chain / "data" / "evaluate" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["best"] in ("train", "distill")
    assert metrics["best_mAP50-95"] == metrics["models"][metrics["best"]]["mAP50-95"]
    decision = json.loads((chain / "data" / "promote" / "decision.json").read_text(encoding="utf-8"))
    assert decision["decision"] == "promoted" and decision["champion_after"] == "1"

    second = _sh("dvc repro", chain)
    assert _ran(second) == []
    assert "up to date" in second.stdout

    set_params(chain, {"distill.alpha": 0.3})
    # up to evaluate: a re-trained candidate would then meet the gate, which may refuse it (exit 3) by design
    third = _sh("dvc repro evaluate", chain)
    assert _ran(third) == ["distill", "evaluate"]
    status = _sh("dvc status", chain)
    assert "export" in status.stdout and "collect" not in status.stdout
    _sh("git add -A && git commit -qm 'baseline for the sweep'", chain)


def test_a_queued_sweep_runs_and_exp_show_ranks_it_by_the_gold_metric(chain: Path):
    if not (chain / "dvc.lock").is_file():
        pytest.skip("needs the repro test's pipeline state (run the module, not this test alone)")
    # the student's last stage (distill) is swept: each experiment re-runs distill and evaluate, ~35 s here, where a
    # train.* grid re-runs train too (~50 s); the queue, the grid expansion, the ranking and `exp apply` are the same
    grid = {"distill.lr0": ["0.0005", "0.002"], "distill.imgsz": ["64", "96"]}
    sets = " ".join(f"-S '{k}={','.join(v)}'" for k, v in grid.items())
    queued = _sh(f"dvc exp run --queue {sets} evaluate", chain)
    assert queued.stdout.count("Queued experiment") == 4, queued.stdout
    _sh("dvc exp run --run-all -j 1", chain, timeout=1500)
    show = _sh(f"dvc exp show --no-pager --csv --sort-by {METRIC} --sort-order desc", chain)
    rows = [r for r in csv.DictReader(io.StringIO(show.stdout)) if r["Experiment"]]
    assert len(rows) == 4, show.stdout
    tried = {(r["distill.lr0"], r["distill.imgsz"]) for r in rows}
    assert tried == {(lr, sz) for lr, sz in itertools.product(*grid.values())}
    scores = [float(r["best_mAP50-95"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # ranked: the first row is the pick
    best = rows[0]["Experiment"]
    _sh(f"dvc exp apply {best}", chain)
    applied = yaml.safe_load((chain / "params.yaml").read_text(encoding="utf-8"))["distill"]
    assert (str(applied["lr0"]), str(applied["imgsz"])) == (rows[0]["distill.lr0"], rows[0]["distill.imgsz"])
