"""The train stage: ultralytics end to end into MLflow, a killed run that resumes, arguments checked up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _project(tmp_path: Path, monkeypatch=None, n_train: int = 16):
    sys.path.insert(0, str(HERE))
    from _shapes import make_dataset

    from wanwu.config import ProjectParams

    if monkeypatch is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.setenv("WANWU_ARTIFACT_ROOT", (tmp_path / "mlartifacts").as_uri())
        monkeypatch.delenv("WANWU_PARENT_RUN_ID", raising=False)
    data_dir = tmp_path / "data"
    make_dataset(data_dir / "quality" / "dataset", n_train=n_train, n_val=8, n_test=4)
    return ProjectParams(data_dir=data_dir, seed=0), data_dir


@pytest.mark.slow
def test_mlflow_train_two_epochs_at_imgsz_64_end_to_end(tmp_path, monkeypatch):
    """The name holds "test_mlflow" so ultralytics' own MLflow callback runs under pytest too."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from ultralytics import YOLO

    from tasks.train import run
    from wanwu.config import TrainParams

    project, data_dir = _project(tmp_path, monkeypatch)
    params = TrainParams(epochs=2, imgsz=64, batch=8, cache=False)  # no proposer here: falls back to yolo11n.yaml
    result = run(params, project)

    assert result.start_model == "yolo11n.yaml" and result.epochs == 2 and not result.resumed
    best = data_dir / "train" / "best.pt"
    assert Path(result.best) == best and best.is_file()
    assert YOLO(str(best)).names == {0: "猫", 1: "狗", 2: "鸟"}
    metrics = json.loads((data_dir / "train" / "metrics.json").read_text())
    assert {"mAP50", "mAP50-95", "epochs"} <= set(metrics) and 0 <= metrics["mAP50"] <= 1

    runs = mlflow.search_runs(experiment_names=["wanwu"], filter_string="tags.`wanwu.stage` = 'train'")
    assert len(runs) == 1
    run_id = runs.iloc[0]["run_id"]
    client = MlflowClient()
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["epochs"] == "2" and info.data.params["train.imgsz"] == "64"  # ultralytics' + ours
    for key in ("train/box_loss", "metrics/mAP50B"):
        steps = {m.step for m in client.get_metric_history(run_id, key)}
        assert {0, 1} <= steps, (key, steps)  # one value per epoch
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "weights")
    }
    assert {"weights/best.pt", "metrics.json"} <= artifacts


def test_unknown_ultralytics_argument_fails_before_training(tmp_path, monkeypatch):
    from tasks.train import run
    from wanwu.config import TrainParams
    from wanwu.training import TrainingError

    project, _ = _project(tmp_path, monkeypatch, n_train=2)
    with pytest.raises(TrainingError, match="epoch"):
        run(TrainParams(epochs=1, imgsz=64, extra={"epoch": 3}), project)


_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from wanwu.offline import harden
harden({repo!r})
from wanwu.config import ProjectParams, TrainParams
from tasks.train import run
run(TrainParams(epochs={epochs}, imgsz=64, batch=8, cache=False), ProjectParams(data_dir={data!r}, seed=0))
"""
_EPOCHS = 12  # an epoch at imgsz 64 takes ~0.3 s on CI: enough of them that the kill cannot miss the run


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    project, data_dir = _project(tmp_path, monkeypatch)
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    code = _CHILD.format(repo=str(REPO), data=str(data_dir), epochs=_EPOCHS)
    last = data_dir / "train" / "run" / "weights" / "last.pt"

    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), "the first epoch never wrote last.pt"
    time.sleep(0.5)  # let the write finish; the kill lands a few epochs in, long before the last
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (data_dir / "train" / "best.pt").exists()  # it did not finish

    from tasks.train import run
    from wanwu.config import TrainParams

    # the same params, started again
    result = run(TrainParams(epochs=_EPOCHS, imgsz=64, batch=8, cache=False), project)
    assert result.resumed and result.epochs == _EPOCHS and Path(result.best).is_file()
    rows = (data_dir / "train" / "run" / "results.csv").read_text().splitlines()[1:]
    epochs = [int(float(r.split(",")[0])) for r in rows]
    assert epochs == list(range(1, _EPOCHS + 1))  # the epoch count continued, nothing redone or lost

    import mlflow

    runs = mlflow.search_runs(experiment_names=["wanwu"], filter_string="tags.`wanwu.stage` = 'train'")
    statuses = sorted(runs["status"])
    assert statuses == ["FINISHED", "KILLED"]
    finished = runs[runs["status"] == "FINISHED"].iloc[0]
    assert finished["tags.wanwu.resumed_from_run"] == runs[runs["status"] == "KILLED"].iloc[0]["run_id"]


def test_the_gpu_profile_overrides_params_yaml_with_known_keys():
    import yaml

    from wanwu.config import load_params
    from wanwu.training import check_args

    overrides = yaml.safe_load((REPO / "params" / "gpu.yaml").read_text())
    params = load_params(REPO / "params.yaml", overrides=overrides)
    assert params.train.imgsz == 640 and params.train.epochs > load_params(REPO / "params.yaml").train.epochs
    assert params.distill.mode == "both"
    check_args(params.train.ultralytics_args())  # every key is an ultralytics argument
    check_args(params.distill.ultralytics_args())


def test_the_cpu_hour_profile_loads_through_the_cli_option():
    """`wanwu run --profile params/cpu60.yaml`: every key known; a bigger world, more student epochs in all and a bigger
    image size than the quick run, the proposer at the student's size."""
    from wanwu.cli import _overrides
    from wanwu.config import load_params

    quick = load_params(REPO / "params.yaml")
    hour = load_params(REPO / "params.yaml", _overrides(["train.epochs=41"], REPO / "params" / "cpu60.yaml"))
    assert hour.train.epochs == 41  # --set wins over the profile
    assert hour.collect.sources[0].uri == "sample://?n=1500&seed=0" != quick.collect.sources[0].uri
    student = lambda p: p.train.epochs + p.distill.epochs  # noqa: E731 - the student's whole schedule
    assert student(hour) > student(quick) and hour.autolabel.experts.epochs > quick.autolabel.experts.epochs
    assert hour.train.imgsz > quick.train.imgsz and hour.autolabel.proposer_train.imgsz == hour.train.imgsz
    assert hour.autolabel.experts.seed_crops > 0 == quick.autolabel.experts.seed_crops  # scene crops: the hour only


@pytest.mark.slow
def test_training_is_deterministic_under_a_seed(tmp_path):
    import torch

    from wanwu.training import fit

    _, data_dir = _project(tmp_path, n_train=8)
    data = data_dir / "quality" / "dataset" / "data.yaml"
    args = {"epochs": 1, "imgsz": 64, "batch": 4, "seed": 7, "deterministic": True, "val": False}
    weights = []
    for name in ("a", "b"):
        result = fit(data, tmp_path / name, model="yolo11n.yaml", device="cpu", progress=None, **args)
        ckpt = torch.load(result.best, map_location="cpu", weights_only=False)
        weights.append(ckpt["model"].float().state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_amp_bf16_runs_where_the_hardware_has_it_else_falls_back(monkeypatch):
    from wanwu.training import resolve_amp

    for env, expected in (("1", (False, True)), ("0", (False, False))):
        monkeypatch.setenv("WANWU_CPU_BF16", env)
        # ultralytics gets amp=False on the CPU either way (its bf16 raises there); wanwu autocasts or not
        assert resolve_amp("bf16", "cpu") == expected
    monkeypatch.delenv("WANWU_CPU_BF16")
    assert resolve_amp(False, "cpu") == (False, False)
    assert resolve_amp(True, "cpu") == (True, False)  # ultralytics' own fp16 AMP: it turns it off on a CPU itself


def test_channels_last_on_the_cpu_where_it_is_the_fast_layout_unless_told():
    from wanwu.training import cpu_channels_last_helps, resolve_channels_last

    # ultralytics gets its default (None) on a CPU, where true would only warn; wanwu applies the layout itself
    assert resolve_channels_last(None, "cpu") == (None, cpu_channels_last_helps())
    assert resolve_channels_last(True, "cpu") == (None, True)
    assert resolve_channels_last(False, "cpu") == (False, False)
    assert resolve_channels_last(None, "0") == (None, False)  # CUDA: ultralytics' own channels-last


@pytest.mark.slow
def test_amp_bf16_trains_the_network_in_bfloat16_on_the_cpu_deterministically(tmp_path, monkeypatch):
    """ultralytics trains fp32 on a CPU whatever amp says; with amp=bf16 wanwu runs the network's forward (so its
    backward) in bfloat16, keeps the loss, optimizer and EMA fp32, saves a plain checkpoint, and repeats under a
    seed. $WANWU_CPU_BF16=1 runs the bf16 path on any CPU (emulated where there is no native bf16: slower only).
    The network trains channels-last where that is the fast layout (channels_last null) and plain when told."""
    import torch

    from wanwu.checkpoints import load_ultralytics
    from wanwu.training import cpu_channels_last_helps, fit

    monkeypatch.setenv("WANWU_CPU_BF16", "1")
    _, data_dir = _project(tmp_path, n_train=8)
    data = data_dir / "quality" / "dataset" / "data.yaml"
    args = {"epochs": 1, "imgsz": 64, "batch": 4, "seed": 7, "deterministic": True}
    seen: dict[str, set] = {}
    layouts: dict[str, set] = {}
    left: dict[str, bool] = {}

    def watch(name: str) -> dict:
        def start(trainer) -> None:  # after wanwu's own on_train_start (its callbacks come first)
            dtypes, nhwc = seen.setdefault(name, set()), layouts.setdefault(name, set())

            def hook(m, i, o) -> None:
                dtypes.add(o.dtype)
                nhwc.add(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous())

            trainer.model.model[0].register_forward_hook(hook)

        def end(trainer) -> None:
            weight = trainer.model.model[0].conv.weight
            left[name] = "predict" in trainer.model.__dict__ or not weight.is_contiguous()

        return {"on_train_start": start, "on_train_end": end}

    weights = {}
    for name, amp, channels_last in (("bf16_a", "bf16", None), ("bf16_b", "bf16", None), ("fp32", False, False)):
        result = fit(
            data,
            tmp_path / name,
            model="yolo11n.yaml",
            device="cpu",
            progress=None,
            callbacks=watch(name),
            amp=amp,
            channels_last=channels_last,
            **args,
        )
        assert result.metrics["metrics/mAP50(B)"] >= 0  # validated (the fp32 EMA) like any run
        model, _ = load_ultralytics(result.best, "best", fuse=False)
        assert "predict" not in model.__dict__  # a plain model in the checkpoint
        weights[name] = model.float().state_dict()
        stamp = json.loads((result.run_dir / "wanwu_args.json").read_text())
        assert stamp["args"]["amp"] == amp  # what was asked is what the run is known by (resume, fingerprint)
    assert seen == {"bf16_a": {torch.bfloat16}, "bf16_b": {torch.bfloat16}, "fp32": {torch.float32}}
    nhwc = cpu_channels_last_helps()  # x86 with oneDNN, as on the CI machines
    assert layouts == {"bf16_a": {nhwc}, "bf16_b": {nhwc}, "fp32": {False}}
    assert left == {"bf16_a": False, "bf16_b": False, "fp32": False}  # the network is plain again after training
    a, b, f = weights["bf16_a"], weights["bf16_b"], weights["fp32"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic under a seed in bf16 too
    assert any(not torch.equal(a[k], f[k]) for k in a)  # and it did train differently from fp32


@pytest.mark.slow
def test_cpu_training_uses_every_core_unless_told(tmp_path, monkeypatch):
    """ultralytics sets cpu_count() - 1 torch threads (one on a 2-core machine); wanwu trains on all of them,
    and $WANWU_TORCH_THREADS caps it."""
    import torch

    from wanwu.training import fit

    _, data_dir = _project(tmp_path, n_train=4)
    data = data_dir / "quality" / "dataset" / "data.yaml"
    args = {"epochs": 1, "imgsz": 64, "batch": 4, "val": False}
    seen: dict[str, int] = {}
    for name, env in (("all", None), ("one", "1")):
        if env is None:
            monkeypatch.delenv("WANWU_TORCH_THREADS", raising=False)
        else:
            monkeypatch.setenv("WANWU_TORCH_THREADS", env)
        record = {"on_train_epoch_start": lambda tr, name=name: seen.__setitem__(name, torch.get_num_threads())}
        fit(data, tmp_path / name, model="yolo11n.yaml", device="cpu", progress=None, callbacks=record, **args)
    assert seen == {"all": len(os.sched_getaffinity(0)), "one": 1}


def test_websocket_keepalive_pings_do_not_shift_the_seeded_augmentation_stream():
    """Inside a flow Prefect's events websocket pings every 20 s; its payloads must not come from the seeded RNG."""
    import random

    import websockets.asyncio.connection as ws_connection

    from wanwu.training import keep_global_rng_for_training

    random.seed(0)
    undisturbed = [random.random() for _ in range(3)]
    keep_global_rng_for_training()
    random.seed(0)
    first = random.random()
    ws_connection.random.getrandbits(32)  # what a keepalive ping draws, on the event-loop thread, mid-epoch
    assert [first, random.random(), random.random()] == undisturbed


@pytest.mark.slow
def test_val_period_validates_every_nth_epoch_and_keeps_best_pt_validated(tmp_path, capsys):
    """train.val_period 2 over 4 epochs: val metrics for epochs 2 and 4 only (NaN, "not measured", for 1 and 3 in
    results.csv), and an epoch without validation never overwrites best.pt."""
    import hashlib

    import pandas as pd

    from wanwu.training import fit

    _, data_dir = _project(tmp_path, n_train=8)
    data = data_dir / "quality" / "dataset" / "data.yaml"
    best_after: list[str] = []

    def record(trainer) -> None:
        best = Path(trainer.best)
        best_after.append(hashlib.sha256(best.read_bytes()).hexdigest() if best.is_file() else "")

    args = {"epochs": 4, "imgsz": 64, "batch": 4, "seed": 0}
    result = fit(
        data,
        tmp_path / "run",
        model="yolo11n.yaml",
        device="cpu",
        progress="train",
        val_period=2,
        callbacks={"on_fit_epoch_end": record},
        **args,
    )
    table = pd.read_csv(result.run_dir / "results.csv")
    validated = table["metrics/mAP50(B)"].notna().tolist()
    assert validated == [False, True, False, True], table
    assert table["train/box_loss"].notna().all()  # the losses are still there every epoch
    assert len(best_after) >= 4 and best_after[2] == best_after[1]  # epoch 3 (not validated) left best.pt alone
    assert "epoch 1/4  not validated this epoch" in capsys.readouterr().err
    assert result.metrics["metrics/mAP50(B)"] >= 0  # the last epoch is always validated


def test_val_period_is_a_wanwu_knob_not_passed_to_ultralytics():
    from wanwu.config import TrainParams

    params = TrainParams(val_period=5)
    assert "val_period" not in params.ultralytics_args(0) and params.val_period == 5
