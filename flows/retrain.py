"""The retrain flow (scheduled weekly in prefect.yaml): collect what is new, then the rest of the pipeline.

A clean no-op when collect found nothing new since the last accepted dataset: no labeling, no training, no
registry change; the flow ends Completed and says so.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from wanwu.config import STAGES, load_params


@flow(name="retrain")
def retrain(params_path: str = "params.yaml", overrides: dict[str, str] | None = None) -> dict[str, Any]:
    from flows.pipeline import pipeline
    from tasks.collect import collect_task

    logger = get_run_logger()
    params = load_params(params_path, overrides)
    collected = collect_task(params.collect, params.project)
    new = collected.images_added + collected.boxes_imported + collected.image_labels_added
    if new == 0:
        logger.info("retrain: nothing new since the last run (%d images, all seen)", collected.images_total)
        print(f"retrain: nothing new ({collected.images_total} images already collected): no-op")
        return {"collect": collected, "retrained": False}
    logger.info("retrain: %d new images, %d new boxes: running the pipeline", collected.images_added, new)
    results = pipeline(params_path=params_path, overrides=overrides, stages=list(STAGES[1:]))
    return {"collect": collected, "retrained": True, **results}
