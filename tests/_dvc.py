"""Shared by the DVC tests: run a command in a temp DVC project, read which stages `dvc repro` ran, edit params."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent


def sh(cmd: str, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """``cmd`` with this environment's tools first on PATH and the project's own stores (harden() puts them
    under the project: the test session's MLflow store and parent run are not passed on)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for k in ("WANWU_PARENT_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(k, None)
    out = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}")
    return out


def ran(out: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` ran, in order."""
    return [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]


def set_params(root: Path, values: dict[str, Any]) -> None:
    """Set dotted keys (``{"train.epochs": 1}``) in ``root/params.yaml``."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in values.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
