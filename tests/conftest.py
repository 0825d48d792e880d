"""Shared fixtures. Keep this small: a fixture belongs here only when several test files need it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

try:  # offline switches before anything imports ultralytics / great_expectations
    from wanwu.offline import harden
except ImportError:  # pragma: no cover - offline.py not written yet
    harden = None
if harden is not None:
    import os
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
