"""DVC runs the same stages: from clean, again (nothing to do), after a param change, experiments, push/pull.

A real DVC project in a temp git repo holding a copy of this project's sources, at a tiny sample world.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _dvc import make_project, set_params
from _dvc import ran as _ran
from _dvc import sh as _sh

TINY = "sample://?n=10&seed=3&catalogue_train=2&catalogue_val=1&generic_train=2&generic_val=1"

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path: Path) -> Path:
    # the later stages train models: not here (tests/test_dvc_chain.py runs them at a tiny size)
    return make_project(tmp_path / "proj", {"collect.sources": [{"uri": TINY}]}, stages=["collect"])


def test_repro_from_clean_then_nothing_then_only_what_a_param_touches(project: Path):
    first = _sh("dvc repro", project)
    assert _ran(first) == ["collect"]
    manifest = project / "data" / "collect" / "manifest.parquet"
    assert manifest.is_file()
    assert (project / "dvc.lock").is_file()

    second = _sh("dvc repro", project)
    assert _ran(second) == []
    assert "up to date" in second.stdout

    set_params(project, {"collect.jpeg_quality": 90})
    status = _sh("dvc status", project)
    assert "collect:" in status.stdout and "modified:" in status.stdout  # the collect params section
    third = _sh("dvc repro", project)
    assert _ran(third) == ["collect"]


def test_push_to_and_pull_from_a_local_remote(project: Path, tmp_path: Path):
    _sh("dvc repro", project)
    remote = tmp_path / "remote"
    _sh(f"dvc remote add -d local {remote}", project)
    _sh("dvc push", project)
    assert any(remote.rglob("*"))
    before = sorted(p.relative_to(project) for p in (project / "data" / "raw").rglob("*.jpg"))
    shutil.rmtree(project / "data" / "raw")
    shutil.rmtree(project / ".dvc" / "cache")
    _sh("dvc pull", project)
    after = sorted(p.relative_to(project) for p in (project / "data" / "raw").rglob("*.jpg"))
    assert before and after == before
    check = _sh("dvc status", project)
    assert "up to date" in check.stdout or "Data and pipelines are up to date" in check.stdout


def test_experiment_run_with_a_set_param(project: Path):
    _sh("git add -A && git commit -qm 'lock' --allow-empty", project)
    _sh("dvc repro && git add -A && git commit -qm repro", project)
    out = _sh("dvc exp run -S collect.jpeg_quality=85 -n q85", project)
    assert "q85" in out.stdout or "q85" in out.stderr
    show = _sh("dvc exp show --no-pager --csv", project)
    assert "q85" in show.stdout and "85" in show.stdout


def test_wanwu_repro_heals_the_lock_file_a_killed_dvc_left_half_written(project: Path):
    """A SIGKILL while DVC rewrites .dvc/tmp/rwlock leaves it empty (seen in the fault suite): plain `dvc repro`
    then refuses to start, `wanwu repro` removes it, says so and runs the pipeline."""
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_text("", encoding="utf-8")  # what the kill leaves: truncated, not yet written
    refused = _sh("dvc repro", project, check=False)
    assert refused.returncode != 0 and "RWLock-file" in refused.stdout + refused.stderr
    healed = _sh("wanwu repro", project)
    assert "half-written" in healed.stderr and "rwlock" in healed.stderr
    assert _ran(healed) == ["collect"]
    assert (project / "data" / "collect" / "manifest.parquet").is_file()
    again = _sh("wanwu repro", project)  # a readable lock file is DVC's: left alone, nothing said
    assert "half-written" not in again.stderr and _ran(again) == []
    rwlock.write_text("", encoding="utf-8")  # any dvc command through `wanwu dvc` (make sweep's exp run) heals too
    status = _sh("wanwu dvc status", project)
    assert "half-written" in status.stderr and "up to date" in status.stdout


def test_wanwu_repro_heals_a_dvc_lock_a_killed_dvc_cut_off(project: Path):
    """DVC rewrites dvc.lock in place: a SIGKILL inside the write leaves it cut off (seen in the fault suite) and
    plain `dvc repro` refuses it; `wanwu repro` drops the cut stage entries (they run again) and says so, and moves a
    file that no longer parses aside."""

    def redone(out) -> bool:  # run again, or restored from DVC's run cache (same deps and params)
        return _ran(out) == ["collect"] or "Stage 'collect' is cached" in out.stdout

    _sh("wanwu repro", project)
    lock = project / "dvc.lock"
    text = lock.read_text(encoding="utf-8")
    cut = text.index("- path:", text.index("deps:")) + 2
    lock.write_text(text[:cut], encoding="utf-8")  # cut right after the first dependency's dash
    refused = _sh("dvc repro", project, check=False)
    assert refused.returncode != 0 and "dvc.lock' validation failed" in refused.stdout + refused.stderr
    healed = _sh("wanwu repro", project)
    assert "cut off" in healed.stderr and "collect" in healed.stderr
    assert redone(healed) and "up to date" in _sh("dvc status", project).stdout
    again = _sh("wanwu repro", project)  # a whole dvc.lock is DVC's: left alone, nothing said
    assert "cut off" not in again.stderr and _ran(again) == []
    assert text.startswith("schema: '2.0'")
    lock.write_text(text[:10], encoding="utf-8")  # cut inside the first line's quotes: no longer YAML
    healed = _sh("wanwu repro", project)
    assert "does not parse" in healed.stderr and (project / "dvc.lock.broken").is_file()
    assert redone(healed) and "up to date" in _sh("dvc status", project).stdout
