"""Shared fixtures. Keep this small: a fixture belongs here only when several test files need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the two cores: one torch thread each (and in the stages they
    # start), set before anything imports torch, instead of two workers × all cores fighting over the same two.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANWU_TORCH_THREADS", "1")
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

try:  # offline switches before anything imports ultralytics / great_expectations
    from wanwu.offline import harden
except ImportError:  # pragma: no cover - offline.py not written yet
    harden = None
if harden is not None:
    import tempfile

    # Tests never write into the project's own MLflow store: a session store in a temp folder unless a test
    # sets its own (most do, under tmp_path).
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='wanwu-mlflow-')}/mlflow.db")
    harden(REPO)


@pytest.fixture(scope="session")
def ontology():
    from wanwu.ontology import Ontology

    return Ontology.load(REPO / "ontology.yaml")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets beside the repo (coco8, raccoon, hymenoptera); tests that need it skip without it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets not found: real-data tests need the shared folder beside the repo")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def shapes_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The shapes world's weak / good / best checkpoints (tests/_shapes.py), trained once per test session: under
    pytest-xdist in the session's root (each worker's basetemp is a folder in it), so the workers share one run."""
    from _shapes import trained_checkpoints

    base = tmp_path_factory.getbasetemp()
    return trained_checkpoints((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shapes-run")


# `make test` hands whole files to two pytest-xdist workers in collection order (`--no-loadscope-reorder`: xdist's
# default hands out the files with the most tests first): the longest files go first, so no long file starts last
# and leaves one worker running alone at the end. Measured (per-worker timeline): with xdist's order the two-test DVC
# chain (~5 min) started last and the other worker sat idle for ~4 min, 688 s in all; in this order both workers end
# within a second of each other, 529 s. The other files keep their order, as does every file's own.
LONG_FIRST = (
    "test_dvc_chain.py",
    "test_export.py",
    "test_faults.py",
    "test_autolabel.py",
    "test_prefect_server.py",
    "test_registry.py",
    "test_caching.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
