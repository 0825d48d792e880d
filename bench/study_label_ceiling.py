"""The labels' share of the gap: the train stage on the same images with the sample world's perfect labels.

After a run on the built-in sample world (`make run`, or `wanwu run --profile params/cpu60.yaml`), this copies the
quality dataset's images (the originals, unpainted; same splits) with the world's truth as labels (distractors left
out; on the gold split the truth is the human gold labels), runs the train stage on that copy with the same params
and profile, and scores it on the gold set with the evaluate stage's own function at the evaluate stage's size
(training size × evaluate.imgsz_scale; figures before that setting were at the training size):

    make label-ceiling                                   # the quick run's data and params
    make label-ceiling PROFILE=params/cpu60.yaml         # the CPU hour's

The difference to the pipeline's own train score is what better auto labels could buy at this model, size and
epoch budget; what is left below 1 is the student's. Writes bench/results/label_ceiling.{json,md}; data/ is not
touched. Nothing here asserts a figure: it reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def truth_dataset(data: Path, out: Path, ontology: Path) -> dict[str, int]:
    """``data``'s quality dataset (same images, same splits) relabeled with the sample world's truth, written by the
    quality stage's own writer. On the gold (test) split the truth is the human gold labels (checked: 300 of 300
    images identical on the CPU hour's world), so the gold set is the pipeline's."""
    import pandas as pd

    from wanwu import contracts
    from wanwu.ontology import Ontology
    from wanwu.quality import write_dataset

    truth_path = data / "collect" / "truth.parquet"
    if not truth_path.is_file():
        raise SystemExit(f"{truth_path}: not there. The ceiling needs the built-in sample world's truth.")
    truth = contracts.read("labels", truth_path)
    splits = {
        f.stem: split
        for split in ("train", "val", "test")
        for f in (data / "quality" / "dataset" / "labels" / split).glob("*.txt")
    }
    images = pd.read_parquet(data / "collect" / "manifest.parquet").drop(columns="split")
    images = images[images["sha256"].isin(splits)].assign(split=lambda x: x["sha256"].map(splits))
    boxes = truth[truth["sha256"].isin(splits) & (truth["label_id"] >= 0)]
    write_dataset(out, data, images, boxes, Ontology.load(ontology))
    return images["split"].value_counts().to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.study_label_ceiling", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default=None, help="the profile the run used, e.g. params/cpu60.yaml")
    ap.add_argument("--set", "-S", action="append", default=None, help="a param override, as `wanwu run -S`")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.study_distill import _project, _score
    from tasks import train as train_stage
    from wanwu.cli import _overrides
    from wanwu.config import load_params
    from wanwu.offline import harden

    harden(ROOT)
    params_path = Path(args.params).resolve()
    params = load_params(params_path, _overrides(args.set, Path(args.profile) if args.profile else None))
    data = (params_path.parent / params.project.data_dir).resolve()
    ours = data / "train" / "best.pt"
    for need in (data / "quality" / "dataset" / "data.yaml", data / "autolabel" / "proposer" / "best.pt", ours):
        if not need.is_file():
            print(f"{need}: not there. Run the pipeline first (with the same --profile): the study reuses its data.")
            return 2
    from wanwu.evaluation import evaluated_imgsz

    size = evaluated_imgsz(params.evaluate, params.train.imgsz)
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wanwu-label-ceiling-") as tmp:
        ds = Path(tmp) / "truth"
        counts = truth_dataset(data, ds / "dataset", params_path.parent / params.project.ontology)
        proj = _project(Path(tmp) / "proj", {"autolabel": data / "autolabel", "quality": ds})
        res = train_stage.run(params.train, proj)
        perfect = _score(Path(res.best), ds / "dataset" / "data.yaml", size)
    pipeline = _score(ours, data / "quality" / "dataset" / "data.yaml", size)
    out = {
        "started": started,
        "profile": args.profile,
        "images": counts,
        "train_epochs": params.train.epochs,
        "imgsz": params.train.imgsz,
        "scored_at": size,
        "pipeline_labels": pipeline,
        "perfect_labels": perfect,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "label_ceiling.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    md = [
        "# The labels' share of the gap (gold set)",
        "",
        f"Run {out['started']} with `make label-ceiling{' PROFILE=' + args.profile if args.profile else ''}`: "
        f"{counts.get('train', 0)} training / {counts.get('val', 0)} val images, train stage {out['train_epochs']} "
        f"epochs at {out['imgsz']} px from the run's proposer, scored at {size} px; {out['seconds']:.0f} s.",
        "",
        "| labels | gold mAP50 | gold mAP50-95 |",
        "|---|---|---|",
        f"| the pipeline's (its train/best.pt) | {pipeline['mAP50']:.4f} | {pipeline['mAP50-95']:.4f} |",
        f"| perfect (the sample world's truth) | {perfect['mAP50']:.4f} | {perfect['mAP50-95']:.4f} |",
    ]
    (RESULTS / "label_ceiling.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
