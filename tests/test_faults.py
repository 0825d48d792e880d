"""The fault suite (issue 9): SIGKILL at seeded random points of collect, autolabel, train, export and promote, then
resume; a full disk on the data folder; two processes running one stage at once.

Every scenario runs the real command (``wanwu stage <name>``, ``dvc repro``) as a subprocess in a temp project and
kills its whole process group with SIGKILL at a point drawn from a seeded RNG: after a random delay, or when a
progress file or a registry row appears (plus a random delay). Then it checks what a user would check:

* tables: no duplicate ids, nothing lost and nothing extra against an uninterrupted reference run;
* files: every stored image byte-identical to the reference's, no temp file left; DVC's cache objects re-hashed
  against their md5 names and ``dvc status`` clean;
* registry: no alias on a version whose artifacts are incomplete; the champion's promotion is in the history;
* MLflow: no run left RUNNING once the next process has started.

The counts are printed; with ``WANWU_FAULTS=N`` set (``make faults`` sets 5; unset means 1) they are also written
to ``bench/results/faults.json``, so `make test` leaves the committed table alone. ``WANWU_FAULTS_SEED`` draws
other kill points.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAULTS = max(1, int(os.environ.get("WANWU_FAULTS", "1")))
SEED = int(os.environ.get("WANWU_FAULTS_SEED", "0"))
RESULTS = REPO / "bench" / "results" / "faults.json"
MODEL = "faults-detector"

# collect: enough images for a kill to land while they are written (about 3 s of work after 2 s of imports)
COLLECT_WORLD = "sample://?n=150&seed=3&size=96&catalogue_train=2&catalogue_val=1&generic_train=2&generic_val=1"
# autolabel: the tiny world and models of tests/test_autolabel.py (a proposer and experts trained for 1 epoch), without
# the single all-domain baseline (it only fills the fusion table) and in 3 shards of 6 images
AUTOLABEL_WORLD = (
    "sample://?n=20&seed=3&size=96&catalogue_train=6&catalogue_val=2&catalogue_size=32&generic_train=6&generic_val=3"
)
TINY_AUTOLABEL = {
    "conf": 0.0,
    "max_det": 6,
    "shard_size": 6,
    "proposer_batch": 4,
    "runner": "local",
    "proposer_train": {"epochs": 1, "imgsz": 64, "batch": 8, "generic_train": None, "generic_val": 3, "seed_repeat": 1},
    "experts": {
        "epochs": 1,
        "imgsz": 16,
        "batch": 16,
        "other_from_domains": 3,
        "generic_other": 6,
        "single_baseline": False,
    },
    "fusion": {"other_crops": 6},
}
TRAIN = {"model": "yolo11n.yaml", "epochs": 6, "imgsz": 64, "batch": 8, "cache": False, "warmup_epochs": 0.0}
GATE = {  # an untrained-looking tiny model must pass: this suite tests the registry's bookkeeping, not the gate
    "floor_map50": 0.0,
    "floor_map50_95": 0.0,
    "min_improvement": 0.0,
    "max_recall_drop": 1.0,
    "latency_budget_ms": 100000,
    "canary": False,
    "lock_timeout_s": 60,
}

pytestmark = pytest.mark.faults


# ---- the tally ------------------------------------------------------------------------------------------------


class Tally:
    """What each scenario injected and what the checks after the resume found."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.t0 = time.monotonic()

    def begin(self, scenario: str) -> random.Random:
        """Start a scenario's clock; its kill points come from this RNG (seeded by WANWU_FAULTS_SEED and its name)."""
        self.t0 = time.monotonic()
        return random.Random(f"{SEED}/{scenario}")

    def add(self, name: str, points: list[dict[str, Any]], clean: bool, **counts: Any) -> dict[str, Any]:
        injected = sum(1 for p in points if p["landed"])
        row = {
            "faults_injected": injected,
            "resumed_cleanly": injected if clean else 0,
            "rows_lost": 0,
            "duplicates": 0,
            "corrupt_files": 0,
            **counts,
            "seconds": round(time.monotonic() - self.t0, 1),
            "kill_points": points,
        }
        self.rows[name] = row
        return row

    def write(self) -> None:
        if not self.rows:
            return
        keys = ("faults_injected", "resumed_cleanly", "rows_lost", "duplicates", "corrupt_files")
        totals = {k: sum(int(r[k]) for r in self.rows.values()) for k in keys}
        out = {
            "command": f"WANWU_FAULTS={FAULTS} WANWU_FAULTS_SEED={SEED} .venv/bin/pytest -m faults -q -s",
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python "
            f"{platform.python_version()}",
            "faults_per_stage": FAULTS,
            "legend": {
                "faults_injected": "SIGKILLs that landed while the process ran, full disks hit, concurrent runs",
                "resumed_cleanly": "of those, the ones after which the resumed run passed every check",
                "rows_lost": "reference rows missing (collect tables, labels), epochs missing from results.csv, "
                "champions the registry history does not record",
                "duplicates": "ids (sha256, box) present twice, epochs trained twice",
                "corrupt_files": "stored files differing from the reference's, DVC cache objects whose md5 is not "
                "their name, checkpoints that do not load, aliases on incomplete model versions",
            },
            "seed": SEED,
            "totals": totals,
            "scenarios": self.rows,
        }
        # the committed table is `make faults`' (it sets WANWU_FAULTS); `make test` only prints its counts
        where = "printed only: `make faults` writes bench/results/faults.json"
        if "WANWU_FAULTS" in os.environ:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(out, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
            where = str(RESULTS.relative_to(REPO))
        print(f"\nfault suite (WANWU_FAULTS={FAULTS}, seed {SEED}) → {where}")
        print(f"  {'scenario':<22}" + "".join(f"{k.replace('_', ' '):>17}" for k in keys) + "  seconds")
        for name, r in [*self.rows.items(), ("total", totals)]:
            print(f"  {name:<22}" + "".join(f"{r[k]:>17}" for k in keys) + f"  {r.get('seconds', '')}")


@pytest.fixture(scope="module")
def tally():
    t = Tally()
    yield t
    t.write()


# ---- projects, processes and kills --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store (SQLite) for the module, created here: a kill must never land in its schema migration."""
    import mlflow
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("faults")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    old = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("WANWU_ARTIFACT_ROOT", (base / "mlartifacts").as_uri())
        mp.setenv("WANWU_MODEL_NAME", MODEL)
        mp.delenv("WANWU_PARENT_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        yield {"base": base, "uri": uri, "db": base / "mlflow.db"}
    mlflow.set_tracking_uri(old)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}
    for k in ("WANWU_PARENT_RUN_ID", "PYTEST_CURRENT_TEST"):
        env.pop(k, None)
    return env


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


_STATE: list[Path] = []  # a project's .wanwu (the extracted CJK font): copied, not extracted again per project


def _project(root: Path, params: dict[str, Any], sources: bool = False) -> Path:
    root.mkdir(parents=True)
    if sources:  # dvc.yaml lists the stage's modules as deps
        for d in ("wanwu", "tasks", "flows"):
            shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "ontology.yaml", root)
    base = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    _merge(base, {"project": {"device": "cpu"}, **params})
    (root / "params.yaml").write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
    if _STATE and (_STATE[0] / "fonts").is_dir():
        shutil.copytree(_STATE[0] / "fonts", root / ".wanwu" / "fonts")
    return root


def _run(
    cmd: list[str], cwd: Path, timeout: float = 600, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if not _STATE and (cwd / ".wanwu" / "fonts").is_dir():
        _STATE.append(cwd / ".wanwu")
    return out


class Trigger:
    """When to kill: ``delay`` s after ``ready()`` first holds (after the start when there is no ``ready``).

    With ``store``, it also waits until the killed process has opened its own MLflow run there.
    """

    def __init__(
        self,
        what: str,
        delay: float = 0.0,
        ready: Callable[[], bool] | None = None,
        store: dict | None = None,
        poll: float = 0.02,
    ):
        self.what, self.delay, self.ready, self.store, self.poll = what, delay, ready, store, poll
        self.armed: float | None = None
        self.pid = 0

    def __call__(self, elapsed: float) -> bool:
        if self.armed is None:
            if self.ready is not None and not self.ready():
                return False
            if self.store is not None and not _owns_running_run(self.store, self.pid):
                return False
            self.armed = elapsed
        return elapsed - self.armed >= self.delay


def _kill(
    cmd: list[str], cwd: Path, trigger: Trigger, log: Path, store: dict | None = None, timeout: float = 300
) -> dict[str, Any]:
    """Start ``cmd`` in its own process group; SIGKILL the group when ``trigger`` fires (unless it ended first).

    With ``store``, the point records whether the process had an MLflow run open when it was killed.
    """
    run_open = None
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        landed = False
        while proc.poll() is None:
            elapsed = time.monotonic() - t0
            trigger.pid = proc.pid
            if trigger(elapsed) or elapsed > timeout:
                run_open = _owns_running_run(store, proc.pid) if store else None
                os.killpg(proc.pid, signal.SIGKILL)
                landed = proc.wait() == -signal.SIGKILL
                break
            time.sleep(trigger.poll)
        proc.wait()
    return {
        "command": " ".join(cmd),
        "trigger": trigger.what,
        "killed_at_s": round(time.monotonic() - t0, 2),
        "landed": landed,  # False: it had already finished (exit code below)
        "exit": proc.returncode,
        **({"mlflow_run_open": run_open} if store else {}),
    }


def _newer(path: Path) -> Callable[[], bool]:
    """``path`` was written after now (by the process about to start, not by the one killed before it)."""
    t = time.time()
    return lambda: path.is_file() and path.stat().st_mtime > t


def _count(pattern: str, root: Path) -> Callable[[], int]:
    return lambda: sum(1 for _ in root.glob(pattern))


def _is_temp(p: Path) -> bool:
    return bool(re.search(r"\.tmp($|[.-])", p.name))


def _temp_files(root: Path) -> list[Path]:
    """Files a writer was still writing (the temp names of the atomic writers), left behind."""
    return [p for p in root.rglob("*") if p.is_file() and _is_temp(p)]


# ---- collect: tables and files against an uninterrupted run ------------------------------------------------

TABLES = {  # table → (id columns, columns compared; timestamps left out)
    "manifest": (["sha256"], ["sha256", "path", "source", "width", "height", "format", "bytes", "split", "phash"]),
    "human_labels": (["sha256", "box_id"], ["sha256", "box_id", "x1", "y1", "x2", "y2", "label_id", "origin"]),
    "truth": (["sha256", "box_id"], ["sha256", "box_id", "x1", "y1", "x2", "y2", "label_id", "origin"]),
    "image_labels": (["sha256"], ["sha256", "label_id", "source_label"]),
    "rejects": (["source", "reason"], ["source", "reason", "sha256"]),
}


def _read_tables(data: Path) -> dict[str, pd.DataFrame | None]:
    out: dict[str, pd.DataFrame | None] = {}
    for name in TABLES:
        p = data / "collect" / f"{name}.parquet"
        out[name] = pd.read_parquet(p) if p.is_file() else None
    return out


def _digests(data: Path) -> dict[str, str]:
    """Every stored picture (raw/ and the sample world's corpora) by relative path → sha256 of its bytes."""
    out = {}
    for sub in ("raw", "world"):
        for p in (data / sub).rglob("*"):
            if p.is_file() and not _is_temp(p):
                content = p.read_bytes()
                if p.suffix == ".yaml":  # a dataset yaml names its folder: the same file in another project
                    content = content.replace(str(data).encode(), b"<data>")
                out[str(p.relative_to(data))] = hashlib.sha256(content).hexdigest()
    return out


def _rows(df: pd.DataFrame, cols: list[str]) -> list[tuple]:
    return [tuple(r) for r in df[cols].itertuples(index=False)]


def _compare_collect(data: Path, ref: dict[str, Any]) -> dict[str, int]:
    """Rows lost / extra / duplicated per table, files lost / extra / corrupt, temp files left (all 0 when clean)."""
    got = _read_tables(data)
    c = {"rows_lost": 0, "rows_extra": 0, "duplicates": 0, "corrupt_files": 0, "files_lost": 0, "files_extra": 0}
    for name, (ids, cols) in TABLES.items():
        want, have = ref["tables"][name], got[name]
        if want is None:
            continue
        if have is None:
            c["rows_lost"] += len(want)
            continue
        c["duplicates"] += int(have.duplicated(ids).sum())
        w, h = set(_rows(want, cols)), set(_rows(have, cols))
        c["rows_lost"] += len(w - h)
        c["rows_extra"] += len(h - w)
    files = _digests(data)
    c["files_lost"] = len(ref["files"].keys() - files.keys())
    c["files_extra"] = len(files.keys() - ref["files"].keys())
    c["corrupt_files"] = sum(1 for k in files.keys() & ref["files"].keys() if files[k] != ref["files"][k])
    c["temp_files_left"] = len(_temp_files(data))
    return c


def _clean(c: dict[str, int]) -> bool:
    return not any(c.values())


@pytest.fixture(scope="module")
def collect_ref(tmp_path_factory):
    root = _project(tmp_path_factory.mktemp("collect-ref") / "p", {"collect": {"sources": [{"uri": COLLECT_WORLD}]}})
    t0 = time.monotonic()
    _run(["wanwu", "stage", "collect"], root)
    data = root / "data"
    ref = {"seconds": time.monotonic() - t0, "tables": _read_tables(data), "files": _digests(data), "root": root}
    assert len(ref["tables"]["manifest"]) > 100 and ref["tables"]["manifest"]["sha256"].is_unique
    return ref


def _collect_project(root: Path, sources: bool = False) -> Path:
    return _project(root, {"collect": {"sources": [{"uri": COLLECT_WORLD}]}}, sources=sources)


def test_collect_killed_at_random_points_resumes_to_the_rows_of_an_uninterrupted_run(collect_ref, tmp_path, tally):
    rng = tally.begin("collect")
    root = _collect_project(tmp_path / "p")
    raw = root / "data" / "raw"
    n = len(collect_ref["tables"]["manifest"])
    points = []
    for i in range(2 * FAULTS):  # each run resumes the one killed before it
        if points and not points[-1]["landed"]:  # it finished before its kill point: start over, or nothing to kill
            shutil.rmtree(root / "data")
        if rng.random() < 0.5:
            d = rng.uniform(0.3, 0.9 * collect_ref["seconds"])
            trig = Trigger(f"after {d:.2f} s", d)
        else:  # k more images stored by this run
            n0 = _count("*/*.jpg", raw)()
            k = rng.randint(1, max(1, n - n0 - 1))
            trig = Trigger(
                f"when it has stored {k} more images", 0.0, lambda k=k, n0=n0: _count("*/*.jpg", raw)() >= n0 + k
            )
        points.append(_kill(["wanwu", "stage", "collect"], root, trig, tmp_path / f"kill{i}.log"))
    _run(["wanwu", "stage", "collect"], root)
    c = _compare_collect(root / "data", collect_ref)
    row = tally.add("collect", points, _clean(c), **c)
    assert row["faults_injected"] >= 1, points
    assert _clean(c), c


# what DVC says when another dvc process holds the repository (its lock) or a stage's outputs (its rwlock)
DVC_BUSY = r"Unable to acquire lock|is busy, it is being blocked by: \(PID \d+\)"


def _dvc_cache_check(root: Path) -> dict[str, int]:
    """Re-hash every object of the DVC cache: its md5 must be its name (``<2 hex>/<30 hex>[.dir]``)."""
    objects = bad = temps = 0
    for p in (root / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if not p.is_file():
            continue
        name = p.parent.name + p.name.removesuffix(".dir")
        if not re.fullmatch(r"[0-9a-f]{32}", name):
            temps += 1  # a transfer DVC did not finish; never referenced
            continue
        objects += 1
        bad += hashlib.md5(p.read_bytes()).hexdigest() != name
    return {"cache_objects": objects, "cache_corrupt": bad, "cache_temp_files": temps}


def test_dvc_repro_killed_while_running_or_caching_leaves_a_verified_cache(collect_ref, tmp_path, tally):
    rng = tally.begin("dvc")
    root = _collect_project(tmp_path / "p", sources=True)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    stages["stages"] = {"collect": stages["stages"]["collect"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, allow_unicode=True), encoding="utf-8")
    for cmd in ("git init -q", "git config user.email f@f", "git config user.name f", "dvc init -q", "git add -A"):
        _run(cmd.split(), root)
    _run(["git", "commit", "-qm", "init"], root)
    seen = root / "data" / "collect" / "seen.parquet"
    points, corrupt = [], 0
    for i in range(2 * FAULTS):
        if points and not points[-1]["landed"]:  # it finished before its kill point: start over
            for out in ("raw", "collect", "world"):
                shutil.rmtree(root / "data" / out, ignore_errors=True)
            (root / "dvc.lock").unlink(missing_ok=True)
        if rng.random() < 0.5:
            d = rng.uniform(0.5, 0.9 * collect_ref["seconds"])  # dvc adds its own start-up: the stage is still on
            trig = Trigger(f"dvc repro, after {d:.2f} s", d)
        else:  # the stage has written its last table: DVC is hashing the outputs and copying them into its cache
            d = rng.uniform(0.0, 1.0)
            trig = Trigger(f"dvc repro, {d:.2f} s after the stage's last output", d, _newer(seen))
        # --no-run-cache: after a start-over the stage runs again rather than being restored from DVC's run cache
        points.append(_kill(["dvc", "repro", "--no-run-cache"], root, trig, tmp_path / f"kill{i}.log"))
        corrupt += _dvc_cache_check(root)["cache_corrupt"]  # after every kill, not only at the end
    # resumed as the README says (`make repro` → `wanwu repro`): a kill inside DVC's in-place rewrite of
    # .dvc/tmp/rwlock leaves it empty, which plain `dvc repro` refuses (treeverse/dvc#7615; seen here once)
    _run(["wanwu", "repro"], root)
    status = _run(["dvc", "status"], root).stdout
    cache = _dvc_cache_check(root)
    c = _compare_collect(root / "data", collect_ref)
    c["corrupt_files"] += corrupt + cache["cache_corrupt"]
    up_to_date = "up to date" in status
    row = tally.add("dvc repro (collect)", points, _clean(c) and up_to_date, **c, **cache, dvc_status=status.strip())
    assert row["faults_injected"] >= 1, points
    assert up_to_date, status
    assert cache["cache_objects"] > len(collect_ref["files"]) // 2 and cache["cache_corrupt"] == 0, cache
    assert _clean(c), c

    # the same pipeline run by two processes at once: DVC's repository lock lets one through, the other waits for
    # it or fails saying why; the outputs and the cache stay whole either way
    tally.begin("concurrent dvc repro")
    for out in ("raw", "collect", "world"):
        shutil.rmtree(root / "data" / out)
    (root / "dvc.lock").unlink()
    logs = [tmp_path / f"both{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(  # --no-run-cache: the stage runs (rather than being restored from DVC's run cache)
            ["dvc", "repro", "--no-run-cache"], cwd=root, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        for log in logs
    ]
    codes = [p.wait(timeout=600) for p in procs]
    said = [" ".join(log.read_text().split()) for log in logs]
    clear = sorted(codes)[0] == 0 and all(
        code == 0 or re.search(DVC_BUSY, out) for code, out in zip(codes, said, strict=True)
    )
    _run(["dvc", "repro"], root)  # after a refused one: nothing left to do
    status = _run(["dvc", "status"], root).stdout
    cache = _dvc_cache_check(root)
    c = _compare_collect(root / "data", collect_ref)
    c["corrupt_files"] += cache["cache_corrupt"]
    refused = [out[:160] for code, out in zip(codes, said, strict=True) if code]
    points = [{"trigger": "2 dvc repro at once", "landed": True, "exits": codes, "refused_with": refused}]
    tally.add("concurrent dvc repro", points, clear and _clean(c) and "up to date" in status, **c, **cache)
    assert clear, said
    assert "up to date" in status and cache["cache_corrupt"] == 0, (status, cache)
    assert _clean(c), c


def test_full_disk_on_the_data_folder_fails_clearly_and_leaves_nothing_half_written(collect_ref, tmp_path, tally):
    """RLIMIT_FSIZE in the child: a write past the limit fails with EFBIG, as a full disk fails with ENOSPC."""
    rng = tally.begin("disk")
    root = _collect_project(tmp_path / "p")
    data = root / "data"
    sizes = sorted(p.stat().st_size for p in (collect_ref["root"] / "data").rglob("*") if p.is_file())
    points, problems = [], []
    for _ in range(FAULTS):
        # well below the largest output, so the run must hit it; above 4 KB, so the lock's owner file still fits
        limit = rng.randint(max(4096, sizes[len(sizes) // 4]), int(0.9 * sizes[-1]))

        def cap(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        t0 = time.monotonic()
        out = subprocess.run(
            ["wanwu", "stage", "collect"], cwd=root, env=_env(), capture_output=True, text=True, preexec_fn=cap
        )
        points.append(
            {
                "trigger": f"file size limit {limit} bytes",
                "landed": out.returncode != 0,
                "exit": out.returncode,
                "killed_at_s": round(time.monotonic() - t0, 2),
                "message": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "",
            }
        )
        err = " ".join(out.stderr.split())
        if out.returncode != 74 or "file too large" not in err or str(data) not in err:
            problems.append(f"exit {out.returncode}, stderr: {out.stderr[-1500:]}")
        # nothing half-written: no temp file, every picture identical to the reference's, every table readable
        c = _compare_collect(data, collect_ref)
        if c["temp_files_left"] or c["corrupt_files"]:
            problems.append(f"after the full disk: {c}")
        for p in data.rglob("*.parquet"):
            try:
                pd.read_parquet(p)
            except Exception as e:  # a truncated table is exactly what this test looks for
                problems.append(f"{p}: unreadable ({e})")
    _run(["wanwu", "stage", "collect"], root)  # space freed: the stage resumes
    c = _compare_collect(data, collect_ref)
    row = tally.add("full disk (collect)", points, _clean(c) and not problems, **c, problems=problems)
    assert row["faults_injected"] == FAULTS, points
    assert not problems, problems
    assert _clean(c), c


def test_two_processes_running_collect_at_once_one_waits_the_store_stays_consistent(collect_ref, tmp_path, tally):
    from filelock import FileLock

    from wanwu.locks import lock_path

    tally.begin("concurrent")
    root = _collect_project(tmp_path / "p")
    lock = FileLock(str(lock_path(root, "collect")))
    lock.acquire()  # a run in progress (held here, so that the overlap does not depend on timing)
    logs = [(tmp_path / f"out{i}.log", tmp_path / f"err{i}.log") for i in range(2)]
    try:
        impatient = _run(["wanwu", "stage", "collect"], root, check=False, WANWU_LOCK_TIMEOUT="0")
        procs = [
            subprocess.Popen(
                ["wanwu", "stage", "collect"], cwd=root, env=_env(), stdout=o.open("w"), stderr=e.open("w")
            )
            for o, e in logs
        ]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all("waiting up to" in e.read_text() for _, e in logs):
            assert all(p.poll() is None for p in procs), [e.read_text() for _, e in logs]
            time.sleep(0.1)
    finally:
        lock.release()  # the two waiting runs go on, one after the other
    for p in procs:
        p.wait(timeout=300)
    results = [(o.read_text(), e.read_text(), p.returncode) for (o, e), p in zip(logs, procs, strict=True)]
    c = _compare_collect(root / "data", collect_ref)
    added = sorted(int(m.group(1)) for out, _, _ in results if (m := re.search(r"collect: (\d+) added", out)))
    ok = (
        impatient.returncode == 75
        and str(lock_path(root, "collect")) in " ".join(impatient.stderr.split())
        and [r[2] for r in results] == [0, 0]
        and all("waiting up to" in err for _, err, _ in results)
        and added == [0, len(collect_ref["tables"]["manifest"])]
    )
    points = [{"trigger": "3 runs of collect at once (one with WANWU_LOCK_TIMEOUT=0)", "landed": True}]
    tally.add("concurrent collect", points, ok and _clean(c), **c, images_added_by_each=added)
    assert impatient.returncode == 75, impatient.stderr
    assert str(lock_path(root, "collect")) in " ".join(impatient.stderr.split())
    assert [r[2] for r in results] == [0, 0], results
    assert all("waiting up to" in err for _, err, _ in results), results
    assert added == [0, len(collect_ref["tables"]["manifest"])], added  # one did the work, the other found it done
    assert _clean(c), c


# ---- MLflow ------------------------------------------------------------------------------------------------


def _stage_runs(stage: str) -> pd.DataFrame:
    import mlflow

    return mlflow.search_runs(experiment_names=["wanwu"], filter_string=f"tags.`wanwu.stage` = '{stage}'")


def _running() -> int:
    import mlflow

    runs = mlflow.search_runs(experiment_names=["wanwu"], filter_string="attributes.status = 'RUNNING'")
    return len(runs)


def _mlflow_counts(stage: str) -> dict[str, Any]:
    """The stage's runs by status, and the status of the latest (the resumed run, which must have FINISHED)."""
    runs = _stage_runs(stage).sort_values("start_time")
    out: dict[str, Any] = {
        f"mlflow_{s.lower()}": int((runs["status"] == s).sum()) for s in ("RUNNING", "FINISHED", "KILLED")
    }
    out["mlflow_last"] = runs["status"].iloc[-1] if len(runs) else None
    return out


def _closed(points: list[dict[str, Any]], *stages: str) -> dict[str, int]:
    """Runs that were open when their process was killed, and runs the next start closed as KILLED."""
    return {
        "mlflow_runs_open_at_kill": sum(1 for p in points if p["landed"] and p.get("mlflow_run_open")),
        "mlflow_runs_closed_as_killed": sum(_mlflow_counts(s)["mlflow_killed"] for s in stages),
    }


# ---- autolabel -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_autolabel_killed_at_random_points_resumes_to_the_rows_of_an_uninterrupted_run(store, tmp_path, tally):
    from tasks import autolabel, collect
    from wanwu import contracts
    from wanwu.config import load_params

    rng = tally.begin("autolabel")
    params = {"collect": {"sources": [{"uri": AUTOLABEL_WORLD}]}, "autolabel": TINY_AUTOLABEL}
    root = _project(tmp_path / "p", params)
    p = load_params(root / "params.yaml")
    collect.run(p.collect, p.project)
    parts = root / "data" / "autolabel" / "parts"
    points = []
    for i in range(FAULTS):
        if points and not points[-1]["landed"]:  # it finished: label again (the models stay cached)
            shutil.rmtree(parts)
            (parts.parent / "labels.parquet").unlink()
        if i % 2:  # training the proposer or the experts (about 15 s, once), labeling, assembling
            trained_already = (parts.parent / "proposer" / "best.pt").is_file()
            d = rng.uniform(0.0, 6.0 if trained_already else 22.0)
            trig = Trigger(f"{d:.1f} s after its MLflow run opened", d, store=store)
        else:  # between two labeling shards (the kinds alternate, so that one fault already resumes labeling)
            n0, k = _count("*/*.parquet", parts)(), rng.randint(1, 2)
            more = lambda k=k, n0=n0: _count("*/*.parquet", parts)() >= n0 + k  # noqa: E731
            trig = Trigger(f"when it has written {k} more labeling parts", 0.0, more, store=store)
        points.append(_kill(["wanwu", "stage", "autolabel"], root, trig, tmp_path / f"kill{i}.log", store))
    _run(["wanwu", "stage", "autolabel"], root)
    labels = contracts.read("labels", root / "data" / "autolabel" / "labels.parquet")

    # the reference: the same models, labeling every image in one uninterrupted run
    ref_root = tmp_path / "ref"
    shutil.copytree(root, ref_root, ignore=shutil.ignore_patterns("parts", "labels.parquet", "mlflow*"))
    rp = load_params(ref_root / "params.yaml")
    ref = autolabel.run(rp.autolabel, rp.project)
    assert ref.model_calls > 0 and ref.cached_images == 0  # labeled here, with the killed run's (cached) models
    want = contracts.read("labels", ref.labels)
    cols = ["sha256", "box_id", "x1", "y1", "x2", "y2", "label_id", "confidence", "needs_review"]
    w, h = set(_rows(want, cols)), set(_rows(labels, cols))
    mlf = _mlflow_counts("autolabel")
    c = {
        "rows_lost": len(w - h),
        "rows_extra": len(h - w),
        "duplicates": int(labels.duplicated(["sha256", "box_id"]).sum()),
        "temp_files_left": len(_temp_files(parts)),
        "corrupt_files": 0,
    }
    closed = _closed(points, "autolabel")
    clean = _clean(c) and mlf["mlflow_running"] == 0 and mlf["mlflow_last"] == "FINISHED"
    clean = clean and closed["mlflow_runs_open_at_kill"] == closed["mlflow_runs_closed_as_killed"]
    row = tally.add("autolabel", points, clean, **c, **mlf, **closed, boxes=len(labels))
    assert row["faults_injected"] >= 1, points
    assert _clean(c), c
    assert mlf["mlflow_running"] == 0 and mlf["mlflow_last"] == "FINISHED", mlf
    assert closed["mlflow_runs_open_at_kill"] == closed["mlflow_runs_closed_as_killed"], closed


# ---- train ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory, tally):
    """The train stage killed at random points, then resumed: its project, and what the checks found."""
    import torch
    from _shapes import make_dataset

    rng = tally.begin("train")
    base = tmp_path_factory.mktemp("train")
    fast = {"latency_runs": 2, "latency_warmup": 1}
    root = _project(
        base / "p",
        {
            "train": TRAIN,
            "evaluate": {"candidates": ["train/best.pt"], "plots": False, **fast},
            "export": {"int8": False, "simplify": False, "parity_images": 2, **fast},
            "promote": GATE,
        },
    )
    make_dataset(root / "data" / "quality" / "dataset", n_train=16, n_val=8, n_test=4)
    last = root / "data" / "train" / "run" / "weights" / "last.pt"
    points = []
    for i in range(FAULTS):
        if i % 2:  # setting up, training an epoch, validating, saving (about 1 s an epoch)
            d = rng.uniform(0.0, 5.0)
            trig = Trigger(f"{d:.1f} s after its MLflow run opened", d, store=store)
        else:  # in a later epoch: the next run resumes from last.pt (the kinds alternate)
            d = rng.uniform(0.0, 2.0)
            trig = Trigger(f"{d:.2f} s after it saved an epoch's last.pt", d, _newer(last))
        points.append(_kill(["wanwu", "stage", "train"], root, trig, base / f"kill{i}.log", store))
    out = _run(["wanwu", "stage", "train"], root)
    epochs = [int(float(r.split(",")[0])) for r in (last.parents[1] / "results.csv").read_text().splitlines()[1:]]
    corrupt = 0
    for w in (root / "data" / "train" / "best.pt", last):
        try:
            torch.load(w, map_location="cpu", weights_only=False)["model"].state_dict()
        except Exception:
            corrupt += 1
    want = list(range(1, TRAIN["epochs"] + 1))
    c = {
        "rows_lost": len(set(want) - set(epochs)),  # epochs missing from results.csv
        "duplicates": len(epochs) - len(set(epochs)),  # epochs trained twice
        "corrupt_files": corrupt,
        "temp_files_left": len(_temp_files(root / "data" / "train")),
    }
    mlf = _mlflow_counts("train")
    closed = _closed(points, "train")
    clean = _clean(c) and mlf["mlflow_running"] == 0 and mlf["mlflow_last"] == "FINISHED"
    clean = clean and closed["mlflow_runs_open_at_kill"] == closed["mlflow_runs_closed_as_killed"]
    row = tally.add("train", points, clean, **c, **mlf, **closed, resumed="(resumed)" in out.stdout, epochs=epochs)
    return {"root": root, "row": row, "c": c, "mlflow": mlf, "closed": closed, "epochs": epochs}


@pytest.mark.slow
def test_train_killed_at_random_points_resumes_without_redoing_or_skipping_an_epoch(trained):
    assert trained["row"]["faults_injected"] >= 1, trained["row"]["kill_points"]
    assert trained["epochs"] == list(range(1, TRAIN["epochs"] + 1)), trained["epochs"]
    assert _clean(trained["c"]), trained["c"]
    m = trained["mlflow"]
    assert m["mlflow_running"] == 0 and m["mlflow_last"] == "FINISHED", m
    closed = trained["closed"]  # every run open at a kill was closed as KILLED by the next start
    assert closed["mlflow_runs_open_at_kill"] == closed["mlflow_runs_closed_as_killed"], closed


# ---- export and promote: the registry -------------------------------------------------------------------------


def _db(store: dict) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{store['db']}?mode=ro", uri=True, timeout=5)


def _owns_running_run(store: dict, pid: int) -> bool:
    with _db(store) as con:
        q = (
            "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
            "where t.key = 'wanwu.pid' and t.value = ? and r.status = 'RUNNING'"
        )
        return con.execute(q, (str(pid),)).fetchone()[0] > 0


def _versions(store: dict) -> int:
    with _db(store) as con:
        return con.execute("select count(*) from model_versions where name = ?", (MODEL,)).fetchone()[0]


def _champion(store: dict) -> str | None:
    with _db(store) as con:
        row = con.execute(
            "select version from registered_model_aliases where name = ? and alias = 'champion'", (MODEL,)
        ).fetchone()
    return str(row[0]) if row else None


def _registry_problems() -> list[str]:
    """An alias on an incomplete version, or a champion the history does not account for."""
    from wanwu import registry

    problems = []
    for alias in (registry.CHAMPION, registry.PREVIOUS):
        mv = registry.get_alias(alias)
        if mv is not None and (bad := registry.verify_version(mv)):
            problems.append(f"{alias} is version {mv.version}, which is incomplete: {'; '.join(bad)}")
    return problems


def _history_problems() -> list[str]:
    from wanwu import registry

    champ = registry.get_alias(registry.CHAMPION)
    if champ is None:
        return []
    moves = [r for r in registry.history() if r["decision"] in ("promoted", "rolled_back", "manual_rollback")]
    if not moves or moves[-1]["champion_after"] != champ.version:
        last = moves[-1]["champion_after"] if moves else None
        return [f"champion is version {champ.version} but the history's last move says {last}"]
    if (champ.tags or {}).get("wanwu.decision") != "promoted":
        return [f"champion version {champ.version} carries decision {champ.tags.get('wanwu.decision')!r}"]
    return []


@pytest.mark.slow
def test_killed_export_and_promote_never_leave_a_half_registered_version_serving(trained, store, tally):
    from tasks import evaluate, export
    from wanwu import registry
    from wanwu.config import load_params

    rng = tally.begin("promote")
    root = trained["root"]
    params = load_params(root / "params.yaml")
    evaluate.run(params.evaluate, params.project)
    problems: list[str] = []  # an alias on an incomplete version: a half-registered model serving
    unrecorded: list[str] = []  # a champion the history does not account for
    points = []

    # export killed while it registers: between the new version and its completion tag (artifacts verified) lie
    # less than 0.1 s; a kill there leaves a half-registered version
    before = _versions(store)
    d = rng.uniform(0.0, 0.03)
    appeared = lambda: _versions(store) > before  # noqa: E731
    trig = Trigger(f"export, {d:.3f} s after its version appears in the registry", d, appeared, poll=0.002)
    points.append(_kill(["wanwu", "stage", "export"], root, trig, root / "kill-export.log", store))
    problems += _registry_problems()
    half = [
        v
        for v in range(before + 1, _versions(store) + 1)
        if registry.get_version(v).tags.get("wanwu.complete") != "true"
    ]
    for v in half:  # a half-registered version asks to be promoted: refused, never aliased
        with pytest.raises(registry.PromotionRefused, match="never finished|missing"):
            registry.promote(v, params.promote)
    problems += _registry_problems()

    for i in range(FAULTS):
        target = export.run(params.export, params.project).version  # the export again, to the end: a complete version
        if i % 2 == 0:  # between moving the alias and recording the decision (the kinds alternate)
            trig = Trigger(
                f"promote, when champion moves to version {target}", 0.0, lambda t=target: _champion(store) == t
            )
        else:
            d = rng.uniform(0.0, 0.25)  # the gate, the aliases, the history, the decision file: a few 0.1 s
            trig = Trigger(f"promote, {d:.2f} s after its MLflow run opened", d, store=store)
        points.append(_kill(["wanwu", "stage", "promote"], root, trig, root / f"kill-promote{i}.log", store))
        problems += _registry_problems()  # right after the kill: nothing incomplete serves
        out = _run(["wanwu", "stage", "promote"], root)  # resumed: finishes the promotion
        if registry.get_alias(registry.CHAMPION).version != target:
            problems.append(f"after the resumed promote the champion is not version {target}: {out.stdout}")
        problems += _registry_problems()
        unrecorded += _history_problems()
    mlf = _mlflow_counts("promote")
    leftover = _running()
    closed = _closed(points, "export", "promote")
    c = {"rows_lost": len(unrecorded), "duplicates": 0, "corrupt_files": len(problems)}
    row = tally.add(
        "export + promote",
        points,
        not problems + unrecorded
        and leftover == 0
        and closed["mlflow_runs_open_at_kill"] == closed["mlflow_runs_closed_as_killed"],
        **c,
        **mlf,
        **closed,
        half_registered_versions_refused=len(half),
        mlflow_running_any_stage=leftover,
        problems=problems + unrecorded,
    )
    assert row["faults_injected"] >= 1, points
    assert not problems, problems
    assert not unrecorded, unrecorded
    assert leftover == 0, "runs left RUNNING after the resumed stages"
    assert closed["mlflow_runs_open_at_kill"] == closed["mlflow_runs_closed_as_killed"], closed
