"""ultralytics training, shared by the proposer (autolabel), the train stage and the distill stage.

Arguments use ultralytics' own names and pass straight through; this module only fixes where outputs go, which
device is used, and three things a pipeline needs that a bare ``model.train`` does not give:

- **resume after a kill**: a run that left ``out_dir/run/weights/last.pt`` behind unfinished, with the same
  arguments, continues from it (ultralytics ``resume``); a run with other arguments, or a finished one, starts
  clean, so a stale checkpoint never leaks into a new configuration;
- **progress** on the terminal (ultralytics' own bars are silent under ``YOLO_VERBOSE=false``);
- **MLflow**: ultralytics' own callback logs parameters, per-epoch metrics and the weights into the active run;
  when it is off (its setting, or under pytest) :func:`fit` logs the same things itself;
- **the same result under a seed inside a flow** as alone: see :func:`keep_global_rng_for_training`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DONE_MARKER = "wanwu_done.json"
ARGS_STAMP = "wanwu_args.json"
# Arguments that decide where a run writes or how it is shown: they do not make a checkpoint a different run.
_NOT_IN_FINGERPRINT = {"workers", "verbose", "plots", "exist_ok", "project", "name", "save_dir", "cache", "device"}


class TrainingError(RuntimeError):
    """Training cannot start or did not produce weights; the message names the file or key and the fix."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``0`` (first GPU) when CUDA is there, else ``cpu``; anything else passes through."""
    if device != "auto":
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def resolve_start_model(model: str, fallback: str | None, root: str | Path) -> str:
    """A checkpoint path relative to ``root`` (made absolute), a model yaml by name, or ``fallback`` when missing.

    ``yolo11n.yaml`` and friends are found by ultralytics itself; a ``.pt`` that does not exist cannot be fetched
    offline, so it falls back (a yaml: training from scratch) with a warning rather than failing the run.
    """
    path = Path(model)
    if not path.is_absolute():
        path = Path(root) / path
    if path.exists():
        return str(path.resolve())
    if model.endswith((".yaml", ".yml")):
        return model
    if fallback:
        log.warning("start model %s does not exist: using %s instead", path, fallback)
        return resolve_start_model(fallback, None, root)
    raise TrainingError(
        f"start model {path} does not exist and there is no fallback. Run the stage that writes it, or set a "
        "model yaml such as yolo11n.yaml (from scratch) in params.yaml."
    )


def check_args(args: dict[str, Any]) -> None:
    """Every key must be an ultralytics argument: a typo fails before a long run, not after it."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    unknown = sorted(set(args) - set(DEFAULT_CFG_DICT))
    if unknown:
        raise TrainingError(
            f"unknown ultralytics argument(s) {unknown}. Keys under train:/distill: (and their extra:) use "
            "ultralytics' own names; see ultralytics/cfg/default.yaml for the list."
        )


@dataclass
class FitResult:
    """What one training run left behind."""

    best: Path
    last: Path
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # final validation of best.pt (ultralytics' keys)
    epochs: int = 0  # epochs completed in total (including those before a resume)
    start_epoch: int = 0  # > 0 when the run resumed
    seconds: float = 0.0
    resumed: bool = False


def _fingerprint(args: dict[str, Any], trainer_tag: str) -> str:
    """Arguments that define the run, plus the bytes of the data yaml and the start model (when files)."""
    core = {k: v for k, v in sorted(args.items()) if k not in _NOT_IN_FINGERPRINT}
    h = hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode())
    h.update(trainer_tag.encode())
    for key in ("data", "model"):
        p = Path(str(args.get(key, "")))
        if p.is_file():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _unfinished_epoch(last: Path) -> int | None:
    """The last saved epoch (0-based) of an unfinished run, or None when ``last`` is not resumable.

    ultralytics strips the optimizer and sets epoch -1 in last.pt once a run ends; before that it is resumable.
    """
    if not last.is_file():
        return None
    import torch

    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    except Exception:  # a checkpoint cut short by the kill: not resumable
        return None
    epoch = ckpt.get("epoch", -1)
    return int(epoch) if epoch >= 0 and ckpt.get("optimizer") is not None else None


def _trim_results(csv: Path, epochs_kept: int) -> None:
    """Drop results.csv rows of epochs after the checkpoint (a kill between the csv row and last.pt)."""
    if not csv.is_file():
        return
    lines = csv.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and float(ln.split(",", 1)[0]) <= epochs_kept]
    if len(keep) != len(lines):
        csv.write_text("".join(keep))


def _progress_callbacks(label: str) -> dict[str, Callable]:
    """One bar over all batches of all epochs, with the epoch, the running loss and the last mAP50."""
    from tqdm.auto import tqdm

    state: dict[str, Any] = {}

    def start(trainer: Any) -> None:
        nb = len(trainer.train_loader)
        state["bar"] = tqdm(
            total=nb * trainer.epochs,
            initial=nb * trainer.start_epoch,
            desc=label,
            unit="batch",
            disable=None,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        state["map"] = None

    def batch_end(trainer: Any) -> None:
        bar = state.get("bar")
        if bar is None:
            return
        if bar.total != len(trainer.train_loader) * trainer.epochs:  # `time` re-estimates the epochs
            bar.total = len(trainer.train_loader) * trainer.epochs
        bar.update(1)
        loss = float(trainer.loss.detach()) / max(int(trainer.batch_size), 1) if trainer.loss is not None else 0.0
        post = {"epoch": f"{trainer.epoch + 1}/{trainer.epochs}", "loss": f"{loss:.3g}"}
        if state["map"] is not None:
            post["mAP50"] = f"{state['map']:.3f}"
        bar.set_postfix(post, refresh=False)

    def epoch_end(trainer: Any) -> None:
        m = trainer.metrics or {}
        if not all(_finite(v) for v in m.values()):  # val_period: this epoch was not validated
            figures = "not validated this epoch"
        elif "metrics/accuracy_top1" in m:  # a classifier (the autolabel experts): accuracy, not mAP
            figures = f"top1 {m['metrics/accuracy_top1']:.4f}  top5 {m.get('metrics/accuracy_top5', 0.0):.4f}"
        else:
            figures = f"mAP50 {m.get('metrics/mAP50(B)', 0.0):.4f}  mAP50-95 {m.get('metrics/mAP50-95(B)', 0.0):.4f}"
            state["map"] = m.get("metrics/mAP50(B)")
        bar = state.get("bar")
        if bar is not None and bar.disable and trainer.epoch < trainer.epochs:  # no terminal: one line per epoch
            print(f"{label}: epoch {trainer.epoch + 1}/{trainer.epochs}  {figures}", file=sys.stderr, flush=True)
        log.info("%s epoch %d/%d: %s", label, trainer.epoch + 1, trainer.epochs, figures)

    def end(trainer: Any) -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.close()

    return {
        "on_train_start": start,
        "on_train_batch_end": batch_end,
        "on_fit_epoch_end": epoch_end,
        "on_train_end": end,
        "teardown": end,
    }


def _mlflow_fallback_callbacks() -> dict[str, Callable]:
    """Log what ultralytics' MLflow callback would, into the active run, when that callback is not active."""

    def mine(trainer: Any) -> bool:
        import mlflow

        return mlflow.active_run() is not None and not getattr(trainer, "_mlflow_active", False)

    def clean(d: dict) -> dict:  # NaN: an epoch val_period did not validate, nothing measured to log
        return {k.replace("(", "").replace(")", ""): float(v) for k, v in d.items() if _finite(v)}

    def params(trainer: Any) -> None:
        if mine(trainer):
            import mlflow

            trainer._wanwu_mlflow = True
            current = mlflow.get_run(mlflow.active_run().info.run_id).data.params
            new = {k: str(v)[:500] for k, v in vars(trainer.args).items() if k not in current}
            mlflow.log_params(new)

    def train_epoch(trainer: Any) -> None:
        if getattr(trainer, "_wanwu_mlflow", False):
            import mlflow

            mlflow.log_metrics(
                {**clean(trainer.lr), **clean(trainer.label_loss_items(trainer.tloss, prefix="train"))},
                step=trainer.epoch,
            )

    def fit_epoch(trainer: Any) -> None:
        if getattr(trainer, "_wanwu_mlflow", False):
            import mlflow

            mlflow.log_metrics(clean(trainer.metrics), step=trainer.epoch)

    def end(trainer: Any) -> None:
        if getattr(trainer, "_wanwu_mlflow", False):
            import mlflow

            mlflow.log_artifact(str(trainer.best.parent))  # weights/ with best.pt and last.pt, as ultralytics does
            trainer._wanwu_mlflow = False

    return {
        "on_pretrain_routine_end": params,
        "on_train_epoch_end": train_epoch,
        "on_fit_epoch_end": fit_epoch,
        "on_train_end": end,
    }


def val_period_callbacks(period: int) -> dict[str, Callable]:
    """Validate every ``period`` epochs and after the last one, instead of after every epoch.

    ultralytics validates after each epoch (``val=True``) or only after the last (``val=False``). On the CPU the
    val split costs a tenth of an epoch; validating less often buys epochs or training images in the same time.
    Epochs without validation record NaN metrics (results.csv, MLflow: "not measured", not a stale or zero
    figure) and no fitness, so they can never be saved as best.pt: best.pt stays the best validated epoch.
    """

    def decide(trainer: Any) -> None:  # on_train_epoch_end: just before ultralytics decides whether to validate
        done = trainer.epoch + 1
        validate = done % period == 0 or done >= trainer.epochs
        trainer.args.val = validate
        if not validate:
            trainer.fitness = None
            trainer.metrics = {k: float("nan") for k in (trainer.metrics or {})}

    return {"on_train_epoch_end": decide}


MLFLOW_RUN_FILE = "wanwu_mlflow_run.json"


def cpu_threads() -> int:
    """Torch threads for CPU training: ``$WANWU_TORCH_THREADS``, else every core this process may use.

    ultralytics' ``select_device`` sets ``cpu_count() - 1`` (to leave a core to dataloader workers; ours are 0 on
    the CPU), which is one thread on a 2-core machine: measured here, 2 threads train an epoch ~25 % faster.
    """
    from wanwu.config import usable_cores

    env = os.environ.get("WANWU_TORCH_THREADS", "").strip()
    return max(1, int(env)) if env else usable_cores()


def threads_callbacks(n: int) -> dict[str, Callable]:
    def set_threads(trainer: Any) -> None:
        import torch

        if getattr(getattr(trainer, "device", None), "type", "cpu") == "cpu":
            torch.set_num_threads(n)

    # on_pretrain_routine_start fires inside the trainer's __init__ (select_device's reset included), before a
    # callback can be added: the end of the routine is the first point after it, before the first epoch.
    return {"on_pretrain_routine_end": set_threads}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16), as its flags say.

    oneDNN also runs bf16 on CPUs without it, emulated and slower than fp32: there a bf16 request stays fp32.
    ``$WANWU_CPU_BF16`` = 0 / 1 overrides the detection (1 on a CPU without it is slower, not wrong).
    """
    env = os.environ.get("WANWU_CPU_BF16", "").strip()
    if env:
        return env not in {"0", "false", "False", "no"}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: no flags to read
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_amp(amp: Any, device: str) -> tuple[Any, bool]:
    """ultralytics' ``amp`` for ``device``, and whether wanwu runs the network in bfloat16 on the CPU itself.

    ultralytics trains fp32 on the CPU whatever ``amp`` says (``amp: bf16`` there raises: its autocast helper
    allows bf16 on CUDA only). On a CPU with native bf16 wanwu runs the network's forward and backward under
    ``torch.autocast("cpu", bfloat16)`` (:func:`cpu_bf16_callbacks`): weights, optimizer and loss stay fp32, as in
    any mixed-precision training. On a GPU without bf16, ``bf16`` becomes ultralytics' fp16 AMP.
    """
    if amp != "bf16":
        return amp, False
    if device == "cpu":
        if cpu_has_native_bf16():
            return False, True
        log.info("amp: bf16 asked, but this CPU has no native bf16 (avx512_bf16 / amx_bf16 / bf16): training fp32")
        return False, False
    if device == "mps":
        return False, False
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.info("amp: bf16 asked, but this GPU has no native bf16: ultralytics' fp16 AMP instead")
        return True, False
    return amp, False


def _as_float32(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _as_float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(v) for v in out)
    return out


def cpu_bf16_callbacks() -> dict[str, Callable]:
    """Run the training network's forward (and so its backward) in bfloat16 on the CPU; the loss stays fp32.

    Measured on the 2-core Zen 4 machine (AVX512-BF16), YOLO11n at 256 px, batch 8, forward + backward: 271 ms
    fp32 → 170 ms bf16. The network's ``predict`` is wrapped from ``on_train_start`` (after the EMA copy, which
    validation and the checkpoints use, so both stay plain fp32 models) to ``on_train_end``. ultralytics'
    feature-distillation model is left fp32: its loss reads the networks' features through hooks.
    """
    import torch
    from ultralytics.nn.tasks import BaseModel
    from ultralytics.utils.torch_utils import unwrap_model

    def start(trainer: Any) -> None:
        net = unwrap_model(trainer.model)
        if not isinstance(net, BaseModel):
            log.info("amp: bf16 is not applied to %s on the CPU: training fp32", type(net).__name__)
            return
        plain = type(net).predict.__get__(net)

        def predict(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = plain(*args, **kwargs)
            return _as_float32(out)

        net.predict = predict  # an instance attribute: the class's own predict is untouched

    def end(trainer: Any) -> None:
        net = unwrap_model(trainer.model)
        net.__dict__.pop("predict", None)

    return {"on_train_start": start, "on_train_end": end}


def cpu_channels_last_helps() -> bool:
    """Whether channels-last (NHWC) convolutions are the fast layout on this CPU: x86 with oneDNN, as ultralytics'
    own predictor decides (``AutoBackend`` turns it on there for inference; its trainer never does on a CPU)."""
    import platform

    import torch

    return (
        platform.machine() in {"x86_64", "AMD64"}
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
    )


def resolve_channels_last(channels_last: Any, device: str) -> tuple[Any, bool]:
    """ultralytics' ``channels_last`` for ``device``, and whether wanwu trains the network channels-last on the CPU.

    ultralytics puts the training network in channels-last on CUDA only ("no benefit on CPU"; ``true`` on a CPU
    warns and is ignored). Measured on the 2-core Zen 4 machine, a student epoch (1,052 images at 320 px, batch
    8) takes 42 s → 36 s in bf16 and 64 s → 50 s in fp32 channels-last; a 64 px classifier step 29 → 26 ms in
    bf16. ``None`` (ultralytics' default): channels-last on a CPU where it is the fast layout
    (:func:`cpu_channels_last_helps`); ``true``: on any CPU; ``false``: never.
    """
    if device != "cpu" or channels_last is False:
        return channels_last, False
    wanted = True if channels_last is True else cpu_channels_last_helps()
    return None, wanted  # ultralytics gets its default: it would only warn on a CPU


def cpu_channels_last_callbacks() -> dict[str, Callable]:
    """Keep the training network channels-last from ``on_train_start`` to ``on_train_end``.

    The EMA copy (validation, checkpoints) is made before and stays in the plain layout; its in-place update
    reads the channels-last weights as any tensors. The network is plain again after training.
    """
    import torch
    from ultralytics.utils.torch_utils import unwrap_model

    def start(trainer: Any) -> None:
        unwrap_model(trainer.model).to(memory_format=torch.channels_last)

    def end(trainer: Any) -> None:
        unwrap_model(trainer.model).to(memory_format=torch.contiguous_format)

    return {"on_train_start": start, "on_train_end": end}


def mlflow_run_link_callbacks(run_id: str) -> dict[str, Callable]:
    """Link a resumed run to the MLflow run of the killed one (tagged KILLED), and remember this run's id."""

    def start(trainer: Any) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        record = Path(trainer.save_dir) / MLFLOW_RUN_FILE
        if trainer.resume and record.is_file():
            previous = json.loads(record.read_text()).get("run_id")
            if previous and previous != run_id:
                client = MlflowClient()
                try:
                    if client.get_run(previous).info.status == "RUNNING":
                        client.set_terminated(previous, status="KILLED")
                    mlflow.set_tag("wanwu.resumed_from_run", previous)
                except Exception as e:  # another store, or the run was deleted: resuming matters more
                    log.warning("could not link the resumed run to MLflow run %s: %s", previous, e)
        record.write_text(json.dumps({"run_id": run_id}))

    return {"on_train_start": start}


def enable_ultralytics_mlflow(enabled: bool = True) -> None:
    """Turn ultralytics' own MLflow callback on (its settings file lives in the project's state folder)."""
    from ultralytics import settings

    if settings.get("mlflow") != enabled:
        settings.update(mlflow=enabled)


# Modules that draw from the global ``random`` on a background thread while a flow runs (websockets' pings and
# reconnect back-off; Prefect uses the asyncio implementation, the deprecated ``legacy`` one is not imported).
_BACKGROUND_RNG_USERS = ("websockets.asyncio.connection", "websockets.sync.connection", "websockets.client")


def keep_global_rng_for_training() -> None:
    """Give the background users of the global ``random`` generator a private one of their own.

    ultralytics seeds the global ``random`` and draws its augmentation from it. Inside ``wanwu run`` Prefect's
    events client keeps a websocket open on its event-loop thread, and websockets draws every keepalive ping's
    payload from the global ``random`` (every 20 s, wherever the training happens to be): the same stage with the
    same seed trained differently inside the flow than alone (proposer epoch-1 box loss 3.6521 vs 3.6529 in two
    fresh runs; the stage alone repeats exactly). Their pings need unique numbers, not the global stream.
    """
    import importlib
    import random

    for name in _BACKGROUND_RNG_USERS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # another websockets version: nothing of it to isolate
            continue
        if getattr(module, "random", None) is random:
            module.random = random.Random()


def fit(
    data_yaml: str | Path,
    out_dir: str | Path,
    model: str | Path = "yolo11n.yaml",
    device: str = "auto",
    *,
    trainer_factory: Callable[..., Any] | None = None,
    auto_resume: bool = True,
    progress: str | None = "train",
    mlflow_fallback: bool = True,
    callbacks: dict[str, Callable] | None = None,
    model_param: str = "model",
    val_period: int = 1,
    **ultralytics_args: Any,
) -> FitResult:
    """Train a detector on ``data_yaml`` into ``out_dir/run`` and copy the best weights to ``out_dir/best.pt``.

    ``trainer_factory(overrides=..., _callbacks=...)`` builds the ultralytics trainer (default: its
    ``DetectionTrainer``; the distill stage passes its soft-label trainer). ``callbacks`` are extra ultralytics
    callbacks by event name. ``val_period``: validate every N epochs and after the last (see
    :func:`val_period_callbacks`).
    """
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import callbacks as ul_callbacks

    from wanwu.checkpoints import check_model_source, load_ultralytics

    # a wrong file fails here, named with the param that points at it (``model_param``), not deep in ultralytics
    model = check_model_source(model, model_param)
    if str(model).endswith(".pt"):  # a PyTorch file that is no ultralytics checkpoint (a state_dict) fails here too
        load_ultralytics(model, model_param, fuse=False)
    out_dir = Path(out_dir).resolve()
    run_dir = out_dir / "run"
    last = run_dir / "weights" / "last.pt"
    args: dict[str, Any] = {"workers": 0, "plots": False, "verbose": False, "exist_ok": True, **ultralytics_args}
    args.update(
        data=str(data_yaml),
        model=str(model),
        device=resolve_device(device),
        project=str(out_dir),
        name="run",
    )
    check_args(args)
    # the fingerprint keeps what was asked (amp: bf16); ultralytics gets what it can run on this device
    ul_amp, cpu_bf16 = resolve_amp(args.get("amp"), args["device"])
    ul_channels_last, cpu_channels_last = resolve_channels_last(args.get("channels_last"), args["device"])
    factory = trainer_factory or DetectionTrainer
    tag = getattr(factory, "fingerprint_tag", None) or getattr(factory, "__qualname__", type(factory).__name__)
    # every N epochs picks best.pt among fewer epochs: another run (1, the default, keeps earlier fingerprints)
    fingerprint = _fingerprint({**args, "wanwu_val_period": val_period} if val_period > 1 else args, str(tag))

    stamp = run_dir / ARGS_STAMP
    same = stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint
    saved_epoch = _unfinished_epoch(last) if auto_resume and same and not (run_dir / DONE_MARKER).exists() else None
    resume = saved_epoch is not None
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # another configuration, or a finished run: start clean
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        stamp.write_text(json.dumps({"fingerprint": fingerprint, "args": args}, default=str, indent=1))

    overrides = dict(args)
    if "amp" in overrides:
        overrides["amp"] = ul_amp
    if "channels_last" in overrides:
        overrides["channels_last"] = ul_channels_last
    if resume:
        log.info("resuming the unfinished run in %s after epoch %d", run_dir, saved_epoch + 1)
        _trim_results(run_dir / "results.csv", saved_epoch + 1)
        # ultralytics takes the run's own arguments from last.pt; these may change on resume (paths, device, …)
        overrides = {k: args[k] for k in ("data", "device", "workers", "cache", "plots") if k in args}
        overrides.update(resume=str(last), model=str(last), save_dir=str(run_dir))

    keep_global_rng_for_training()
    cbs = ul_callbacks.get_default_callbacks()
    trainer = factory(overrides=overrides, _callbacks=cbs)
    extra: list[dict[str, Callable]] = [threads_callbacks(cpu_threads())]
    if cpu_bf16:
        extra.append(cpu_bf16_callbacks())
    if cpu_channels_last:
        extra.append(cpu_channels_last_callbacks())
    if val_period > 1:
        extra.insert(0, val_period_callbacks(val_period))  # first: the loggers after it see this epoch's metrics
    if mlflow_fallback:
        extra.append(_mlflow_fallback_callbacks())
    if progress:
        extra.append(_progress_callbacks(progress))
    if callbacks:
        extra.append(callbacks)
    for group in extra:
        for event, fn in group.items():
            trainer.add_callback(event, fn)

    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    best = Path(trainer.best)
    if not best.is_file():
        best = Path(trainer.last)
    if not best.is_file():
        raise TrainingError(f"training in {run_dir} ended without weights (no best.pt or last.pt). See the log above.")
    target = out_dir / "best.pt"
    shutil.copyfile(best, target)
    metrics = {k: float(v) for k, v in (getattr(trainer, "metrics", None) or {}).items() if _is_number(v)}
    (run_dir / DONE_MARKER).write_text(json.dumps({"seconds": seconds, "metrics": metrics}, indent=1))
    return FitResult(
        best=target,
        last=Path(trainer.last),
        run_dir=run_dir,
        metrics=metrics,
        epochs=int(trainer.epoch) + 1,
        start_epoch=int(trainer.start_epoch),
        seconds=seconds,
        resumed=resume,
    )


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def train_detector(
    data_yaml: str | Path,
    out_dir: str | Path,
    model: str | Path = "yolo11n.yaml",
    device: str = "auto",
    **ultralytics_args: Any,
) -> Path:
    """Train an ultralytics detector on ``data_yaml``; return ``out_dir/best.pt``.

    ``model`` is a yaml (from scratch) or a checkpoint (fine-tune). Runs go to ``out_dir/run`` and the best
    weights are copied to ``out_dir/best.pt`` so later stages find them in one place. A killed run resumes when
    called again with the same arguments (see :func:`fit`, which also returns the metrics).
    """
    return fit(data_yaml, out_dir, model=model, device=device, **ultralytics_args).best
