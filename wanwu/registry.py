"""The model registry: log and register versions, the promotion gate, aliases, history and rollback (MLflow).

One registered model, ``wanwu-detector`` (``$WANWU_MODEL_NAME`` overrides it: the name is infrastructure, not an ML
knob). Two aliases, never the deprecated stages: ``champion`` (what serves) and ``previous`` (what a rollback
returns to). Each promoted version remembers the champion it replaced (tag ``wanwu.promoted_over``), so rollbacks
walk back the chain.

Rules this module keeps:

- **Complete before aliased.** A version is tagged ``wanwu.complete=true`` only after its artifacts were listed
  back from the artifact store (MLmodel, the pickled pyfunc, the ONNX file with the size recorded at export, the
  PyTorch weights, labels.json); an alias is only ever set on a version that passes that check again.
- **One promotion at a time.** Promotions and rollbacks take a file lock (next to the SQLite store, or
  ``$WANWU_REGISTRY_LOCK``, which must be on a shared file system when several machines promote against one
  server), re-read the champion under the lock and gate against *that* champion; after moving the alias they
  read it back. Two promotions at once therefore leave exactly one champion, and the second is judged against
  the first.
- **Every decision is recorded** (promoted, refused, rolled_back, manual_rollback) as one MLflow run in the
  experiment ``wanwu-promotions``: tags for the decision, versions and reason, metrics for the figures. That is
  the history's one source of truth, and it works the same against a remote tracking server
  (``wanwu history`` lists it). The version itself also carries the latest decision as tags.
- **Refusals raise** :class:`PromotionRefused` after they are recorded, with the figure, the threshold and what
  to do.

The registered version is the pyfunc model (:class:`wanwu.pyfunc.WanwuDetector`: images in, labelled boxes out).
Its artifacts keep the PyTorch checkpoint beside the ONNX file, so the champion is re-evaluated with exactly the
same ultralytics validator as the candidates (``artifacts/model.pt``); the raw ONNX flavour is logged in the same
run as a second model (``mlflow.onnx``), its URI in the version tag ``wanwu.onnx_model_uri``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wanwu.config import PromoteParams
from wanwu.evaluation import LAT95, MAP, MAP50, recall_by_id

CHAMPION = "champion"
PREVIOUS = "previous"
HISTORY_EXPERIMENT = "wanwu-promotions"
PYFUNC_NAME = "detector"  # the logged model that is registered
ONNX_NAME = "onnx"  # the raw ONNX flavour, logged beside it
T = "wanwu."  # tag prefix

PROMOTED, REFUSED, ROLLED_BACK, MANUAL_ROLLBACK, UNCHANGED = (
    "promoted",
    "refused",
    "rolled_back",
    "manual_rollback",
    "unchanged",
)


def model_name() -> str:
    return os.environ.get("WANWU_MODEL_NAME", "wanwu-detector")


# ---- errors ----------------------------------------------------------------------------------------------


class RegistryError(RuntimeError):
    """The registry is not in the state an operation needs; the message says which and what to do."""


class IncompleteVersion(RegistryError):
    """A version's artifacts are missing or were never verified; it must never get an alias."""


class NothingToRollBack(RegistryError):
    """There is no champion, or no previous version to return to."""


@dataclass
class Check:
    """One gate condition with its figures."""

    name: str
    passed: bool
    figure: float | None
    threshold: float | None
    detail: str
    fix: str = ""


@dataclass
class Decision:
    """A promotion, refusal or rollback, with the figures behind it (what the history lists)."""

    decision: str
    model: str
    version: str | None
    champion_before: str | None
    champion_after: str | None
    reason: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    decided_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"))
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromotionRefused(RuntimeError):
    """The gate refused a candidate (recorded before this is raised); carries the decision and its figures."""

    def __init__(self, decision: Decision):
        self.decision = decision
        failed = [c for c in decision.checks if not c.passed]
        self.figure = failed[0].figure if failed else None
        self.threshold = failed[0].threshold if failed else None
        lines = [
            f"{decision.model} version {decision.version} refused; champion stays "
            f"{'version ' + decision.champion_after if decision.champion_after else '(none)'}:"
        ]
        for c in failed:
            lines.append(f"  - {c.name}: {c.detail}" + (f" Fix: {c.fix}" if c.fix else ""))
        super().__init__("\n".join(lines))


# ---- MLflow plumbing -------------------------------------------------------------------------------------


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return None


def lock_path() -> Path:
    """Where promotions serialize: ``$WANWU_REGISTRY_LOCK``, else beside the SQLite store, else per tracking URI."""
    import mlflow

    if os.environ.get("WANWU_REGISTRY_LOCK"):
        return Path(os.environ["WANWU_REGISTRY_LOCK"])
    uri = mlflow.get_tracking_uri()
    db = _sqlite_path(uri)
    if db is not None:
        return db.with_name(db.name + ".registry.lock")
    return Path(tempfile.gettempdir()) / f"wanwu-registry-{hashlib.sha1(uri.encode()).hexdigest()[:12]}.lock"


@contextlib.contextmanager
def registry_lock(timeout: float = 600.0) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=timeout):
            yield
    except Timeout:
        raise RegistryError(
            f"{path}: another promotion or rollback held the registry lock for {timeout:.0f} s. Wait for it, or "
            "delete the lock file if its process is gone; promote.lock_timeout_s sets the wait."
        ) from None


def _artifact_location() -> str | None:
    import mlflow

    if os.environ.get("WANWU_ARTIFACT_ROOT"):
        return os.environ["WANWU_ARTIFACT_ROOT"]
    db = _sqlite_path(mlflow.get_tracking_uri())
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def _history_experiment_id(client: Any) -> str:
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    with contextlib.suppress(Exception):  # another process may create it at the same moment
        return client.create_experiment(HISTORY_EXPERIMENT, artifact_location=_artifact_location())
    return client.get_experiment_by_name(HISTORY_EXPERIMENT).experiment_id


def _norm(mv: Any) -> Any:
    # the SQL store answers alias lookups with an int version and other calls with a str: one type everywhere
    if mv is not None and not isinstance(mv.version, str):
        mv._version = str(mv.version)
    return mv


def get_alias(alias: str, client: Any = None) -> Any | None:
    """The model version an alias points at, or None (no alias, or no registered model yet)."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        return _norm(client.get_model_version_by_alias(model_name(), alias))
    except MlflowException:
        return None


def get_version(version: str | int, client: Any = None) -> Any:
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        return _norm(client.get_model_version(model_name(), str(version)))
    except MlflowException as e:
        raise RegistryError(
            f"{model_name()} has no version {version} ({e.message}). `wanwu history` lists them."
        ) from None


def _weights_sha256(mv: Any) -> str | None:
    """The version's weights hash: its tag, or (versions registered before the tag) its model.pt artifact's."""
    if tag := (mv.tags or {}).get(T + "weights_sha256"):
        return tag
    from wanwu.export import sha256_file

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return sha256_file(download_file(mv.version, "artifacts/model.pt", tmp))
    except Exception:  # no such artifact (a foreign version): never "the same"
        return None


def _same_weights(a: Any, b: Any) -> str | None:
    """The weights hash two versions share, or None."""
    ha = _weights_sha256(a)
    return ha if ha and ha == _weights_sha256(b) else None


def version_metrics(mv: Any) -> dict[str, Any]:
    """The gold-set figures recorded on a version at export (tag ``wanwu.metrics``)."""
    raw = (mv.tags or {}).get(T + "metrics")
    if not raw:
        raise RegistryError(
            f"{mv.name} version {mv.version} has no {T}metrics tag: it was not registered by `wanwu stage export`."
        )
    return json.loads(raw)


def _list_files(repo: Any, path: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for info in repo.list_artifacts(path or None):
        if info.is_dir:
            out.update(_list_files(repo, info.path))
        else:
            out[info.path] = int(info.file_size or 0)
    return out


def version_files(version: str | int) -> dict[str, int]:
    """Every artifact file of a registered version with its size, listed from the artifact store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(f"models:/{model_name()}/{version}")
    return _list_files(repo)


def required_files(mv: Any) -> dict[str, int | None]:
    """What a complete version holds: path → exact size when known (the ONNX file's), else None (non-empty)."""
    tags = mv.tags or {}
    onnx_file = tags.get(T + "onnx_file", "model.onnx")
    onnx_bytes = tags.get(T + "onnx_bytes")
    return {
        "MLmodel": None,
        "python_model.pkl": None,
        f"artifacts/{onnx_file}": int(onnx_bytes) if onnx_bytes else None,
        "artifacts/model.pt": None,
        "artifacts/labels.json": None,
    }


def verify_version(mv: Any, require_complete_tag: bool = True) -> list[str]:
    """What is wrong with a version's artifacts (empty list: complete)."""
    problems = []
    if require_complete_tag and (mv.tags or {}).get(T + "complete") != "true":
        problems.append(f"tag {T}complete is not 'true' (its export never finished)")
    try:
        files = version_files(mv.version)
    except Exception as e:  # an unreachable or deleted artifact location is an incomplete version
        return [*problems, f"artifacts cannot be listed ({e})"]
    for path, size in required_files(mv).items():
        if path not in files:
            problems.append(f"{path} is missing")
        elif size is not None and files[path] != size:
            problems.append(f"{path} has {files[path]} bytes, {size} were registered")
        elif files[path] == 0:
            problems.append(f"{path} is empty")
    return problems


def download_file(version: str | int, path: str, dst_dir: str | Path) -> Path:
    """One artifact file of a registered version, downloaded into ``dst_dir``."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(f"models:/{model_name()}/{version}")
    return Path(repo.download_artifacts(path, str(dst_dir)))


# ---- provenance ------------------------------------------------------------------------------------------


def git_commit(root: str | Path) -> str:
    """HEAD of the project's git repository, ``-dirty`` when the tree has uncommitted changes; ``unknown`` else."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except Exception:
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def data_version(dataset_dir: str | Path, root: str | Path) -> str:
    """The dataset's DVC hash from dvc.lock (``dvc:<md5>``), else a content hash of its files (``sha256:…``)."""
    import yaml

    dataset_dir, root = Path(dataset_dir).resolve(), Path(root).resolve()
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
        except yaml.YAMLError:
            stages = {}
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                p = (root / out.get("path", "")).resolve()
                if p == dataset_dir and out.get("md5"):
                    return f"dvc:{out['md5']}"
        for stage in stages.values():  # the dataset inside a tracked folder: that folder's hash
            for out in stage.get("outs", []) or []:
                p = (root / out.get("path", "")).resolve()
                if p in dataset_dir.parents and out.get("md5"):
                    return f"dvc:{out['md5']}:{dataset_dir.relative_to(p)}"
    h = hashlib.sha256()
    for f in sorted(q for q in dataset_dir.rglob("*") if q.is_file() and not q.name.endswith(".cache")):
        h.update(str(f.relative_to(dataset_dir)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return f"sha256:{h.hexdigest()}"


# ---- logging and registering -----------------------------------------------------------------------------


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("onnxruntime", "numpy", "pandas", "pillow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _signature(conf: float, iou: float, max_det: int = 300) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema(
        [
            ColSpec("long", "image"),
            ColSpec("double", "x1"),
            ColSpec("double", "y1"),
            ColSpec("double", "x2"),
            ColSpec("double", "y2"),
            ColSpec("long", "class_id"),
            ColSpec("string", "name_zh"),
            ColSpec("string", "name_en"),
            ColSpec("double", "confidence"),
        ]
    )
    params = ParamSchema(
        [ParamSpec("conf", "double", conf), ParamSpec("iou", "double", iou), ParamSpec("max_det", "long", max_det)]
    )
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=outputs, params=params)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """MLflow's advice that does not apply here: the signature is explicit (no type hints, no input example, which
    would be a path on this machine) and the pickle is our own class, pickled by value on purpose."""
    import logging
    import warnings

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Passing a Python object as `python_model`" not in record.getMessage()

    log = logging.getLogger("mlflow.pyfunc")
    drop = _Drop()
    log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
            yield
    finally:
        log.removeFilter(drop)


def _tag_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def log_and_register(
    onnx_path: str | Path,
    weights: str | Path,
    labels: dict[str, Any],
    metrics: dict[str, Any],
    tags: dict[str, Any] | None = None,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
) -> Any:
    """Log the ONNX flavour and the pyfunc in the active MLflow run, register the pyfunc, tag it, verify its
    artifacts and only then mark it complete. Returns the ModelVersion."""
    import cloudpickle
    import mlflow
    import onnx

    import wanwu.pyfunc as pyfunc_module

    if mlflow.active_run() is None:
        raise RegistryError("log_and_register needs an active MLflow run (use wanwu.tracking.stage_run).")
    onnx_path, weights = Path(onnx_path), Path(weights)
    if weights.name != "model.pt":
        raise RegistryError(f"{weights}: the weights artifact must be named model.pt (export_onnx writes it so).")
    reqs = _pip_requirements()
    onnx_info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name=ONNX_NAME,
        pip_requirements=reqs,
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = Path(tmp) / "labels.json"
        labels_path.write_text(json.dumps(labels, ensure_ascii=False, indent=2), encoding="utf-8")
        # by value: the registered model loads where the wanwu package is not installed
        cloudpickle.register_pickle_by_value(pyfunc_module)
        try:
            with _quiet_logging():
                info = mlflow.pyfunc.log_model(
                    name=PYFUNC_NAME,
                    python_model=pyfunc_module.WanwuDetector(),
                    artifacts={"onnx": str(onnx_path), "weights": str(weights), "labels": str(labels_path)},
                    signature=_signature(conf, iou),
                    pip_requirements=reqs,
                    model_config={"conf": conf, "iou": iou, "max_det": 300},
                )
        finally:
            cloudpickle.unregister_pickle_by_value(pyfunc_module)
    from wanwu.export import sha256_file

    all_tags = {
        T + "metrics": metrics,
        T + MAP50: metrics.get(MAP50),
        T + MAP: metrics.get(MAP),
        T + LAT95: metrics.get(LAT95),
        T + "onnx_file": onnx_path.name,
        T + "onnx_bytes": onnx_path.stat().st_size,
        T + "onnx_sha256": sha256_file(onnx_path),
        T + "weights_sha256": sha256_file(weights),  # a re-export of the same weights is not a new model
        T + "onnx_model_uri": onnx_info.model_uri,
        T + "imgsz": labels.get("imgsz"),
        T + "run_id": mlflow.active_run().info.run_id,
        **(tags or {}),
    }
    mv = mlflow.register_model(
        info.model_uri, model_name(), tags={k: _tag_value(v) for k, v in all_tags.items() if v is not None}
    )
    client = _client()
    mv = client.get_model_version(model_name(), mv.version)
    problems = verify_version(mv, require_complete_tag=False)
    if problems:
        raise IncompleteVersion(
            f"{model_name()} version {mv.version}: artifacts incomplete after upload: {'; '.join(problems)}. "
            "It stays unmarked and can never be promoted; re-run the export."
        )
    client.set_model_version_tag(model_name(), mv.version, T + "complete", "true")  # written last
    return _norm(client.get_model_version(model_name(), mv.version))


# ---- the gate --------------------------------------------------------------------------------------------


def _names_by_id(metrics: dict[str, Any]) -> dict[int, str]:
    return {int(v["id"]): k for k, v in (metrics.get("per_class") or {}).items()}


def gate(candidate: dict[str, Any], champion: dict[str, Any] | None, p: PromoteParams) -> list[Check]:
    """Every condition a candidate must meet, with its figures (all are evaluated; none short-circuits)."""
    checks = [
        Check(
            f"{MAP50} floor",
            candidate[MAP50] >= p.floor_map50,
            candidate[MAP50],
            p.floor_map50,
            f"{MAP50} {candidate[MAP50]:.4f}, floor {p.floor_map50} (promote.floor_map50).",
            "train longer or on more data; lower the floor only for a smoke run.",
        ),
        Check(
            f"{MAP} floor",
            candidate[MAP] >= p.floor_map50_95,
            candidate[MAP],
            p.floor_map50_95,
            f"{MAP} {candidate[MAP]:.4f}, floor {p.floor_map50_95} (promote.floor_map50_95).",
            "train longer or on more data; lower the floor only for a smoke run.",
        ),
    ]
    lat = candidate.get(LAT95)
    if lat is not None:
        checks.append(
            Check(
                "latency p95",
                lat <= p.latency_budget_ms,
                lat,
                p.latency_budget_ms,
                f"CPU p95 {lat:.1f} ms, budget {p.latency_budget_ms} ms (promote.latency_budget_ms).",
                "export a smaller model or imgsz, or raise the budget if the serving hardware allows.",
            )
        )
    if champion is not None:
        need = champion[MAP] + p.min_improvement
        checks.append(
            Check(
                "beats champion",
                candidate[MAP] >= need,
                candidate[MAP],
                need,
                f"{MAP} {candidate[MAP]:.4f} vs champion {champion[MAP]:.4f} + margin {p.min_improvement} = {need:.4f} "
                "(promote.min_improvement).",
                "the champion keeps serving; improve the candidate (more data, epochs, distillation) and re-run.",
            )
        )
        cand_r, champ_r = recall_by_id(candidate), recall_by_id(champion)
        names = {**_names_by_id(champion), **_names_by_id(candidate)}
        drops = {cid: r - cand_r.get(cid, 0.0) for cid, r in champ_r.items()}
        if drops:
            worst = max(drops, key=lambda c: drops[c])
            checks.append(
                Check(
                    "per-class recall",
                    drops[worst] <= p.max_recall_drop,
                    round(drops[worst], 5),
                    p.max_recall_drop,
                    f"worst class {names.get(worst, worst)} (id {worst}) recall {champ_r[worst]:.3f} → "
                    f"{cand_r.get(worst, 0.0):.3f}, a drop of {drops[worst]:.3f}; at most {p.max_recall_drop} "
                    "(promote.max_recall_drop).",
                    "add labeled examples of that class (review queue) and retrain.",
                )
            )
    return checks


def _figures(prefix: str, m: dict[str, Any] | None) -> dict[str, float]:
    if not m:
        return {}
    return {f"{prefix}_{k}": float(m[k]) for k in (MAP50, MAP, LAT95) if m.get(k) is not None}


def record(decision: Decision) -> str:
    """One run in the ``wanwu-promotions`` experiment: the history's row. Returns its run id."""
    import time

    from mlflow.entities import Metric, RunTag

    client = _client()
    exp = _history_experiment_id(client)
    d = decision
    tags = {
        T + "decision": d.decision,
        T + "model": d.model,
        T + "version": d.version or "",
        T + "champion_before": d.champion_before or "",
        T + "champion_after": d.champion_after or "",
        T + "reason": d.reason[:7900],
        T + "decided_at": d.decided_at,
        T + "checks": json.dumps([asdict(c) for c in d.checks], ensure_ascii=False)[:7900],
    }
    run = client.create_run(exp, run_name=f"{d.decision} v{d.version}", tags=tags)
    now = int(time.time() * 1000)
    metrics = [Metric(k.replace("-", "_"), float(v), now, 0) for k, v in d.figures.items() if v is not None]
    client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag("mlflow.runName", f"{d.decision} v{d.version}")])
    client.set_terminated(run.info.run_id, "FINISHED")
    d.run_id = run.info.run_id
    return run.info.run_id


def history(limit: int = 1000, all_models: bool = False) -> list[dict[str, Any]]:
    """Every recorded decision about the registered model (or every model in the store), oldest first."""
    client = _client()
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is None:
        return []
    rows = []
    query = "" if all_models else f"tags.`{T}model` = '{model_name()}'"
    runs = client.search_runs(
        [exp.experiment_id], filter_string=query, max_results=limit, order_by=["attributes.start_time ASC"]
    )
    for r in runs:
        t = r.data.tags
        rows.append(
            {
                "decided_at": t.get(T + "decided_at", ""),
                "decision": t.get(T + "decision", ""),
                "model": t.get(T + "model", ""),
                "version": t.get(T + "version", ""),
                "champion_before": t.get(T + "champion_before", ""),
                "champion_after": t.get(T + "champion_after", ""),
                "reason": t.get(T + "reason", ""),
                "figures": dict(r.data.metrics),
                "run_id": r.info.run_id,
            }
        )
    return sorted(rows, key=lambda row: row["decided_at"])


def _set_tags(client: Any, version: str, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(model_name(), version, k, _tag_value(v))


def _set_alias_checked(client: Any, alias: str, version: str) -> None:
    mv = client.get_model_version(model_name(), version)
    problems = verify_version(mv)
    if problems:
        raise IncompleteVersion(f"{model_name()} version {version} cannot become {alias!r}: {'; '.join(problems)}.")
    client.set_registered_model_alias(model_name(), alias, version)


def promote(
    version: str | int,
    params: PromoteParams,
    candidate_metrics: dict[str, Any] | None = None,
    *,
    champion_metrics: dict[str, Any] | None = None,
    champion_version: str | int | None = None,
) -> Decision:
    """Gate ``version`` against the current champion and move the aliases if it passes.

    ``candidate_metrics`` / ``champion_metrics`` are the figures the evaluate stage measured on the same gold set;
    when the champion found under the lock is not ``champion_version`` (it moved since), the gate uses that
    champion's recorded figures instead. Refusals are recorded, then raised as :class:`PromotionRefused`.
    """
    client = _client()
    version = str(version)
    with registry_lock(params.lock_timeout_s):
        mv = get_version(version, client)
        champ = get_alias(CHAMPION, client)
        before = champ.version if champ else None
        if champ is not None and champ.version == version:
            if _last_move() != version:  # moved by a process killed before it recorded the decision
                return _finish_interrupted(client, mv, candidate_metrics)
            return Decision(UNCHANGED, model_name(), version, before, before, f"version {version} is already champion")
        if champ is not None and (same := _same_weights(mv, champ)):
            # export re-ran (its code changed) on unchanged weights: nothing to gate, nothing to move
            return Decision(
                UNCHANGED,
                model_name(),
                version,
                before,
                before,
                f"version {version} holds the champion's weights (version {champ.version}, weights sha256 "
                f"{same[:12]}…): nothing to promote",
            )
        problems = verify_version(mv)
        candidate = candidate_metrics or version_metrics(mv)
        note = ""
        if champ is not None:
            if champion_metrics is None or str(champion_version) != champ.version:
                if champion_metrics is not None:
                    note = f" (champion moved to version {champ.version} since evaluation: its recorded figures used)"
                champion_metrics = version_metrics(champ)
        else:
            champion_metrics = None
        checks = [
            Check(
                "artifacts complete",
                not problems,
                None,
                None,
                "; ".join(problems) or "all artifacts present",
                "re-run the export stage.",
            )
        ]
        checks += gate(candidate, champion_metrics, params)
        figures = {
            **_figures("candidate", candidate),
            **_figures("champion", champion_metrics),
            "min_improvement": params.min_improvement,
        }
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        if all(c.passed for c in checks):
            # the figures the rollback monitor compares with go on first; the decision tag after the alias moved
            _set_tags(
                client,
                version,
                {
                    T + "promoted_over": before or "",
                    T + f"promoted.{MAP}": candidate[MAP],
                    T + f"promoted.{MAP50}": candidate[MAP50],
                },
            )
            if champ is not None:
                client.set_registered_model_alias(model_name(), PREVIOUS, champ.version)
            _set_alias_checked(client, CHAMPION, version)
            if (got := get_alias(CHAMPION, client)) is None or got.version != version:
                raise RegistryError(
                    f"{model_name()}: alias {CHAMPION!r} reads back as {got.version if got else None}, not {version}: "
                    f"something moved it without the registry lock ({lock_path()})."
                )
            _set_tags(client, version, {T + "decision": PROMOTED, T + "decided_at": now})
            summary = (
                "first champion: floors met"
                if champ is None
                else f"{MAP} {candidate[MAP]:.4f} beats version {champ.version}'s {champion_metrics[MAP]:.4f} "
                f"by ≥ {params.min_improvement}"
            )
            decision = Decision(PROMOTED, model_name(), version, before, version, summary + note, checks, figures)
        else:
            reason = "; ".join(f"{c.name}: {c.detail.rstrip('.')}" for c in checks if not c.passed) + note
            _set_tags(client, version, {T + "decision": REFUSED, T + "decided_at": now, T + "refusal": reason})
            decision = Decision(REFUSED, model_name(), version, before, before, reason, checks, figures)
        record(decision)
    if decision.decision == REFUSED:
        raise PromotionRefused(decision)
    return decision


def _last_move() -> str | None:
    """The champion the history's last promotion or rollback left (None when it records none)."""
    moves = [r for r in history() if r["decision"] in (PROMOTED, ROLLED_BACK, MANUAL_ROLLBACK)]
    return moves[-1]["champion_after"] if moves else None


def _finish_interrupted(client: Any, mv: Any, candidate_metrics: dict[str, Any] | None) -> Decision:
    """Record a promotion whose process was killed after it moved the alias but before it recorded the decision.

    Without this the re-run found the version already champion and returned ``unchanged``, and the history never
    said how the champion got there (found by tests/test_faults.py: a SIGKILL between the alias and the record).
    """
    version = mv.version
    before = (mv.tags or {}).get(T + "promoted_over") or None
    reason = f"version {version} became champion in a run that stopped before recording it; recorded by the re-run"
    decision = Decision(
        PROMOTED, model_name(), version, before, version, reason, [], _figures("candidate", candidate_metrics)
    )
    _set_tags(client, version, {T + "decision": PROMOTED, T + "decided_at": decision.decided_at})
    record(decision)
    return decision


def rollback(
    reason: str,
    *,
    automatic: bool = False,
    expected_champion: str | None = None,
    figures: dict[str, float] | None = None,
    timeout: float = 600.0,
) -> Decision | None:
    """Move ``champion`` back to ``previous`` (and ``previous`` one step further back), recording why.

    With ``expected_champion`` nothing happens (None is returned) when the champion has moved meanwhile.
    """
    client = _client()
    with registry_lock(timeout):
        champ = get_alias(CHAMPION, client)
        if champ is None:
            raise NothingToRollBack(f"{model_name()} has no champion: nothing to roll back.")
        if expected_champion is not None and champ.version != str(expected_champion):
            return None
        prev = get_alias(PREVIOUS, client)
        if prev is None:
            raise NothingToRollBack(
                f"{model_name()} version {champ.version} is champion with no {PREVIOUS!r} version to return to. "
                "Promote another version instead (`wanwu stage promote`)."
            )
        _set_alias_checked(client, CHAMPION, prev.version)
        older = (prev.tags or {}).get(T + "promoted_over")
        if older and older not in {prev.version, champ.version} and not verify_version(get_version(older, client)):
            client.set_registered_model_alias(model_name(), PREVIOUS, older)
        else:
            client.delete_registered_model_alias(model_name(), PREVIOUS)
        kind = ROLLED_BACK if automatic else MANUAL_ROLLBACK
        _set_tags(
            client,
            champ.version,
            {
                T + "decision": kind,
                T + "rolled_back": "true",
                T + "rollback_reason": reason,
                T + "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )
        decision = Decision(kind, model_name(), champ.version, champ.version, prev.version, reason, [], figures or {})
        record(decision)
    return decision


@dataclass
class HealthCheck:
    """A re-evaluation of the champion: the figure now, the figure at promotion and the rollback threshold."""

    version: str
    metric: str
    figure: float
    recorded: float
    threshold: float
    passed: bool
    data: str
    context: str
    rollback: Decision | None = None


def check_and_rollback(
    data_yaml: str | Path,
    params: PromoteParams,
    *,
    split: str = "test",
    imgsz: int | None = None,
    context: str = "monitor",
    batch: int = 16,
) -> HealthCheck | None:
    """Re-evaluate the champion (its registered weights) on ``data_yaml``; roll back automatically when the figure
    falls below (1 − rollback_tolerance) × the figure recorded at its promotion. None when there is no champion.

    The monitor flow calls it on newly labeled data; the promote stage calls it right after a promotion on the
    gold set (the canary: the registered artifacts must reproduce the figure the gate saw).
    """
    from wanwu.evaluation import evaluate_model

    client = _client()
    champ = get_alias(CHAMPION, client)
    if champ is None:
        return None
    metric = params.rollback_metric
    tags = champ.tags or {}
    recorded = float(tags.get(T + f"promoted.{metric}") or version_metrics(champ)[metric])
    size = imgsz or int(tags.get(T + "imgsz") or 640)
    with tempfile.TemporaryDirectory() as tmp:
        weights = download_file(champ.version, "artifacts/model.pt", tmp)
        m = evaluate_model(weights, data_yaml, split=split, imgsz=size, batch=batch, latency_runs=2, latency_warmup=0)
    threshold = (1.0 - params.rollback_tolerance) * recorded
    result = HealthCheck(
        champ.version,
        metric,
        float(m[metric]),
        recorded,
        threshold,
        float(m[metric]) >= threshold,
        str(data_yaml),
        context,
    )
    _set_tags(client, champ.version, {T + "last_check": {k: v for k, v in asdict(result).items() if k != "rollback"}})
    if not result.passed:
        reason = (
            f"{context}: {metric} {result.figure:.4f} on {data_yaml} ({split}) is below "
            f"(1 − {params.rollback_tolerance}) × {recorded:.4f} at promotion = {threshold:.4f}"
        )
        result.rollback = rollback(
            reason,
            automatic=True,
            expected_champion=champ.version,
            timeout=params.lock_timeout_s,
            figures={f"check_{metric}": result.figure, f"promoted_{metric}": recorded, "threshold": threshold},
        )
    return result
