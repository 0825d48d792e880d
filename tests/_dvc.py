"""Shared by the DVC tests: run a command in a temp DVC project, read which stages `dvc repro` ran, edit params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


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


def make_project(root: Path, params: dict[str, Any], stages: list[str] | None = None) -> Path:
    """A temp git + DVC repo holding a copy of this project's code, params (with ``params`` set) and dvc.yaml
    (only ``stages`` when given), committed."""
    root.mkdir(parents=True)
    for d in ("wanwu", "tasks", "flows"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("ontology.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / f, root)
    set_params(root, params)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    if stages:
        spec["stages"] = {name: spec["stages"][name] for name in stages}
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    (root / "data").mkdir()
    (root / ".gitignore").write_text("mlflow.db*\nmlartifacts/\n.wanwu/\nruns/\n__pycache__/\n", encoding="utf-8")
    sh("git init -q && git config user.email t@t && git config user.name t", root)
    sh("dvc init -q && dvc config core.analytics false", root)
    sh("git add -A && git commit -qm init", root)
    return root
