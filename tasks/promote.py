"""promote stage: the gate. The exported version replaces the champion only when it is measurably better.

Reads ``export/registered.json`` (the version) and ``evaluate/metrics.json`` (its figures and the champion's, on
the same gold set). The gate (:func:`wanwu.registry.gate`): mAP50-95 above the champion's by
``promote.min_improvement``, no class losing more than ``promote.max_recall_drop`` recall, p95 CPU latency within
``promote.latency_budget_ms``, absolute floors (what the first model must pass). Every decision is recorded in
the registry's history (``wanwu history``) and in ``promote/decision.json``; a refusal then raises
:class:`~wanwu.registry.PromotionRefused`, so the run ends failed with its reason.

After a promotion the canary re-evaluates the new champion from the registry's own artifacts on the gold set; if
it falls more than ``promote.rollback_tolerance`` below the figure the gate saw, ``champion`` moves back to
``previous`` at once and the stage fails with :class:`CanaryFailed`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import lazy_task
from wanwu.config import Params, ProjectParams, PromoteParams


class StageInputMissing(FileNotFoundError):
    """A file the stage reads is not there; the message says which stage writes it."""


class CanaryFailed(RuntimeError):
    """The new champion did not reproduce its figure from the registry's artifacts; it was rolled back."""


GATE_EXIT = 3  # a gate failure's exit code, told apart from a crash (1) by dvc repro, CI and schedulers


def gate_failures() -> tuple[type[Exception], ...]:
    """The decisions that end a run without being crashes: a refusal by the gate, a canary that rolled back."""
    from wanwu.registry import PromotionRefused

    return (PromotionRefused, CanaryFailed)


class PromoteResult(BaseModel):
    decision: str
    version: str | None
    champion: str | None
    reason: str
    decision_file: str
    canary: dict[str, Any] | None = None


def _write(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _read(path: Path, writer: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageInputMissing(f"{path}: not there. Run `wanwu stage {writer}` first.")
    return json.loads(path.read_text(encoding="utf-8"))


def run(params: PromoteParams, project: ProjectParams) -> PromoteResult:
    """Gate the exported version against the champion; move the aliases or record the refusal and raise."""
    import mlflow

    from wanwu import registry, tracking
    from wanwu.offline import harden

    root = harden(Path(project.data_dir).parent)
    data_dir = Path(project.data_dir)
    reg = _read(data_dir / "export" / "registered.json", "export")
    ev = _read(data_dir / "evaluate" / "metrics.json", "evaluate")
    if not reg.get("version"):
        raise StageInputMissing(
            f"{data_dir / 'export' / 'registered.json'}: no registered version "
            "(export.log_model was false). Re-run `wanwu stage export` with it true."
        )
    candidate = ev["models"][reg["candidate"]]
    champion = ev["models"].get("champion")
    out = data_dir / "promote" / "decision.json"
    logged = {f"promote.{k}": v for k, v in params.model_dump().items()} | {"promote.version": reg["version"]}
    with tracking.stage_run("promote", root, params=logged):
        try:
            decision = registry.promote(
                reg["version"],
                params,
                candidate,
                champion_metrics=champion,
                champion_version=champion.get("version") if champion else None,
            )
        except registry.PromotionRefused as e:
            _write(out, {**e.decision.to_dict(), "canary": None})
            mlflow.set_tags({"wanwu.decision": e.decision.decision, "wanwu.reason": e.decision.reason[:5000]})
            raise
        canary = None
        if decision.decision == registry.PROMOTED and params.canary:
            hc = registry.check_and_rollback(
                ev["gold"]["data"], params, split=ev["gold"]["split"], imgsz=int(ev["gold"]["imgsz"]), context="canary"
            )
            if hc is not None:
                canary = {k: v for k, v in asdict(hc).items() if k != "rollback"}
                if hc.rollback is not None:
                    _write(out, {**hc.rollback.to_dict(), "canary": canary})
                    raise CanaryFailed(
                        f"canary: version {hc.version} scored {hc.metric} {hc.figure:.4f} from the registry's "
                        f"artifacts, below {hc.threshold:.4f}; rolled back to version {hc.rollback.champion_after}. "
                        "Check that the export and the evaluation used the same weights and gold set."
                    )
        _write(out, {**decision.to_dict(), "canary": canary})
        mlflow.set_tags({"wanwu.decision": decision.decision, "wanwu.reason": decision.reason[:5000]})
        mlflow.log_artifact(str(out))
    return PromoteResult(
        decision=decision.decision,
        version=decision.version,
        champion=decision.champion_after,
        reason=decision.reason,
        decision_file=str(out),
        canary=canary,
    )


def print_summary(r: PromoteResult) -> None:
    print(f"promote: {r.decision} version {r.version}; champion is version {r.champion}. {r.reason}")


def run_stage(params: Params) -> PromoteResult:
    """`wanwu stage promote` (what `dvc repro` calls). A refusal exits non-zero with the gate's reason."""
    try:
        r = run(params.promote, params.project)
    except gate_failures() as e:
        print(f"promote: {e}", file=sys.stderr)
        raise SystemExit(GATE_EXIT) from None
    print_summary(r)
    return r


def _task() -> Any:
    import prefect

    return prefect.task(run, name="promote")  # no retries: a refusal is a decision, not a hiccup


__getattr__ = lazy_task(globals(), "promote", _task)
