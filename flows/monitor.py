"""The monitor flow (scheduled daily in prefect.yaml): re-evaluate the champion on newly labeled data and roll
back to the previous champion automatically when it falls more than ``promote.rollback_tolerance`` below the
figure recorded at its promotion. The decision is recorded in the promotion history either way.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task

from wanwu.config import PromoteParams, load_params


@task(name="check_champion", retries=1, retry_delay_seconds=10)
def check_champion(data_yaml: str, params: PromoteParams, split: str, root: str) -> dict[str, Any] | None:
    from wanwu import registry, tracking

    tracking.setup(root)
    hc = registry.check_and_rollback(data_yaml, params, split=split, context="monitor")
    return None if hc is None else asdict(hc)


@flow(name="monitor")
def monitor(
    params_path: str = "params.yaml",
    data_yaml: str | None = None,
    split: str = "test",
    overrides: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """``data_yaml``: the newly labeled data (an ultralytics data.yaml); default: the quality stage's dataset."""
    params = load_params(params_path, overrides)
    root = str(Path(params_path).resolve().parent)
    data = data_yaml or str(params.project.data_dir / "quality" / "dataset" / "data.yaml")
    result = check_champion(data, params.promote, split, root)
    if result is None:
        print("monitor: no champion registered yet: nothing to check")
    elif result["rollback"] is None:
        print(
            f"monitor: champion v{result['version']} {result['metric']} {result['figure']:.4f} "
            f"(at promotion {result['recorded']:.4f}, floor {result['threshold']:.4f}): healthy"
        )
    else:
        print(f"monitor: ROLLED BACK: {result['rollback']['reason']}")
    return result
