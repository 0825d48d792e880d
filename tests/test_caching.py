"""Stage results are cached by their inputs' content (what dvc.yaml declares), not by run id."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows.caching import cached, missing_outputs, stage_key


class _Section(BaseModel):
    epochs: int = 3


class _Params(BaseModel):
    project: _Section = _Section()
    train: _Section = _Section()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {"stages": {"train": {"deps": ["code.py", "data/in"], "params": ["project", "train"], "outs": ["out"]}}}
        )
    )
    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "a.txt").write_text("a")
    return tmp_path


def test_the_key_follows_content_and_params_not_time(root: Path):
    p = _Params()
    k1 = stage_key(root, "train", p)
    (root / "data" / "in" / "a.txt").write_text("a")  # rewritten, same bytes: same key
    (root / "data" / "in" / "labels.cache").write_text("ultralytics' own cache")  # ignored
    assert stage_key(root, "train", p) == k1
    (root / "data" / "in" / "a.txt").write_text("b")
    k2 = stage_key(root, "train", p)
    assert k2 != k1
    assert stage_key(root, "train", _Params(train=_Section(epochs=4))) != k2
    (root / "code.py").write_text("print(2)\n")
    assert stage_key(root, "train", p) != k2
    assert stage_key(root, "collect", p) is None  # never cached: its sources live outside the project
    other = root / "copy"
    other.mkdir()
    for name in ("dvc.yaml", "code.py"):
        (other / name).write_bytes((root / name).read_bytes())
    (other / "data" / "in").mkdir(parents=True)
    (other / "data" / "in" / "a.txt").write_text("b")
    assert stage_key(other, "train", p) != stage_key(root, "train", p)  # results hold paths: per checkout


def test_a_cached_task_does_not_run_again_for_the_same_key(root: Path):
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    calls = []

    @task
    def work(x: int) -> _Section:
        calls.append(x)
        return _Section(epochs=x)

    @flow
    def f(key: str) -> _Section:
        return cached(work, key)(7)

    with prefect_test_harness(server_startup_timeout=180):
        a = f(stage_key(root, "train", _Params()))
        b = f(stage_key(root, "train", _Params()))
        (root / "data" / "in" / "a.txt").write_text("new data")
        c = f(stage_key(root, "train", _Params()))
    assert a == b == c == _Section(epochs=7)
    assert isinstance(b, _Section)  # the JSON-persisted result comes back typed
    assert len(calls) == 2  # the second run was a cache hit; new data ran it again


def test_a_stage_that_made_its_outputs_is_a_hit_next_time_and_runs_again_when_they_are_deleted(root: Path):
    """The first run makes the outputs; the next run with nothing changed must still find its result."""
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    calls = []

    @task
    def work(x: int) -> int:
        calls.append(x)
        (root / "out").write_text("made")
        return x

    @flow
    def f() -> int:
        key, refresh = stage_key(root, "train", _Params()), bool(missing_outputs(root, "train"))
        return cached(work, key, refresh=refresh)(3)

    with prefect_test_harness(server_startup_timeout=180):
        assert missing_outputs(root, "train") == ["out"]
        f()
        assert missing_outputs(root, "train") == []
        f()  # nothing changed: a hit, although "out" did not exist when the first key was made
        assert len(calls) == 1
        (root / "out").unlink()
        f()  # the output was deleted by hand: the stage runs again under the same key
        assert len(calls) == 2 and (root / "out").is_file()
        f()
    assert len(calls) == 2
