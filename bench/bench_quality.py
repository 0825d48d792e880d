"""Quality-stage time on the labels of 1,000 images (`make bench`).

The world is tests/_quality_world.py at 1,000 scenes of 128×128 (collect + autolabel tables with truth, about
2,000 boxes per table): the whole stage runs (selection, NMS, splits, 24 great-expectations checks with data docs,
cleanlab scores of the gold labels, drift, precision/recall against the truth, plots, the dataset written as
hard links). The baseline, measured in the same process, is the work any exporter does without checking
anything: read the tables and write the same YOLO dataset.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 1000


def bench(tmp_dir: Path) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    import pandas as pd
    from _quality_world import make_world

    from tasks import quality as tq
    from wanwu import contracts
    from wanwu import quality as q
    from wanwu.config import ProjectParams, QualityParams
    from wanwu.ontology import Ontology

    project = ProjectParams(data_dir=Path(tmp_dir) / "data", ontology=REPO / "ontology.yaml")
    ontology = Ontology.load(project.ontology)
    t = time.perf_counter()
    world = make_world(project.data_dir, N_IMAGES, classes=tuple(range(8)), seed=0, size=128)
    gen = time.perf_counter() - t
    params = QualityParams()

    t = time.perf_counter()
    cold = tq.run(params, project, track=False)  # pays the imports (torch, great_expectations, cleanlab, …)
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = tq.run(params, project, track=False)
    warm_s = time.perf_counter() - t
    timings = json.loads(Path(warm.metrics).read_text())["timings_s"]

    # baseline: read the tables, write the same dataset, no checks
    t = time.perf_counter()
    contracts.read("manifest", project.data_dir / "collect" / "manifest.parquet")
    contracts.read("labels", project.data_dir / "collect" / "human_labels.parquet")
    contracts.read("labels", project.data_dir / "autolabel" / "labels.parquet")
    soft = contracts.read("labels", warm.soft_labels)
    images = world.manifest.drop(columns=["split"]).merge(pd.read_parquet(warm.splits), on="sha256")
    q.write_dataset(Path(tmp_dir) / "baseline" / "dataset", project.data_dir, images, soft, ontology)
    base_s = time.perf_counter() - t

    boxes = len(world.human) + len(world.auto)
    rows = [
        {
            "name": f"quality stage on {N_IMAGES} images ({boxes} input boxes), warm process",
            "value": round(warm_s, 2),
            "unit": "s",
            "baseline": "read the tables and write the same YOLO dataset, no checks",
            "baseline_value": round(base_s, 2),
            "ratio": round(warm_s / base_s, 1),
            "goal": "≤ 30 s per 1,000 images",
            "met": warm_s <= 30,
        },
        {
            "name": f"quality stage on {N_IMAGES} images, cold process (imports torch, GE, cleanlab)",
            "value": round(cold_s, 2),
            "unit": "s",
            "baseline": "the same run in a warm process",
            "baseline_value": round(warm_s, 2),
            "ratio": round(cold_s / warm_s, 2),
            "goal": "≤ 60 s",
            "met": cold_s <= 60,
        },
    ]
    for phase in ("analyse", "expectations", "report", "dataset"):
        rows.append(
            {
                "name": f"  of which {phase}",
                "value": round(timings.get(phase, 0.0), 2),
                "unit": "s",
                "baseline": "the warm stage",
                "baseline_value": round(warm_s, 2),
                "ratio": round(timings.get(phase, 0.0) / warm_s, 2),
                "goal": "",
            }
        )
    rows.append(
        {
            "name": "synthetic world generation (not part of the stage)",
            "value": round(gen, 2),
            "unit": "s",
            "baseline": "",
            "baseline_value": None,
            "ratio": None,
            "goal": "",
        }
    )
    assert warm.images["train"] > 0 and cold.passed
    return rows


if __name__ == "__main__":
    import tempfile

    from wanwu.offline import harden

    harden(REPO)
    with tempfile.TemporaryDirectory() as d:
        for r in bench(Path(d)):
            print(r)
