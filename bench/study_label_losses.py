"""Where the auto labels lose the sample world's objects: the proposer's recall, the teachers' "other", a prior shift.

After a run on the built-in sample world (`make run`, or `wanwu run --profile params/cpu60.yaml`), three readings of
its own files against the world's truth (class-aware or agnostic, IoU 0.5, on the pool and gold images it labeled):

1. the proposer (data/autolabel/proposer/best.pt, at its training size, NMS at --iou) run again at a low confidence:
   the share of true objects it finds at several thresholds, and boxes per image (what the teachers then name);
2. of the true objects an auto box found, the share the teachers named "other" and the share they named right,
   per class (labels.parquet's top-k, as written by the autolabel stage);
3. the accepted labels' precision and recall if P(other) were scaled by w before the argmax (a prior shift toward
   objects), accepted meaning an object class at a top probability ≥ the bar (quality.min_auto_confidence);
4. each teacher alone on the gold crops, from the autolabel stage's fusion table: of its own classes' objects, the
   share it names right and "other"; of the other objects and of the distractors, the share it rejects ("other"):
   an expert that cannot say "not mine" turns distractors and other domains into its classes.

    make label-losses                     # after any run on the sample world

Writes bench/results/label_losses.{json,md}; data/ is not touched. Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFS = (0.1, 0.05, 0.03, 0.02, 0.01)
PRIORS = (1.0, 0.7, 0.5, 0.35)
TEACHER_COLUMNS = ("own_objects", "own_right", "own_other", "foreign_rejected", "distractors_rejected")


def proposer_recall(data: Path, images, truth, iou: float, batch: int = 32) -> list[dict]:
    """Agnostic recall of the truth and boxes per image at each of CONFS, one predict pass at the lowest."""
    import pandas as pd
    from ultralytics import YOLO

    from wanwu.quality import match_counts

    weights = data / "autolabel" / "proposer" / "best.pt"
    if not weights.is_file():
        return [{"note": f"{weights}: not there (the run used a given proposer): skipped"}]
    model = YOLO(str(weights))
    imgsz = int((model.ckpt or {}).get("train_args", {}).get("imgsz", 640))
    rows = []
    paths = [str(data / p) for p in images["path"]]
    shas = images["sha256"].tolist()
    for i in range(0, len(paths), batch):
        for sha, r in zip(
            shas[i : i + batch],
            model.predict(paths[i : i + batch], conf=min(CONFS), iou=iou, imgsz=imgsz, verbose=False),
            strict=True,
        ):
            for xyxy, c in zip(r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), strict=True):
                rows.append((sha, *map(float, xyxy), float(c), 0))
    pred = pd.DataFrame(rows, columns=["sha256", "x1", "y1", "x2", "y2", "confidence", "label_id"])
    out = []
    for conf in CONFS:
        p = pred[pred["confidence"] >= conf]
        m = match_counts(p, truth)
        found = int(m.loc[m["class_id"] == -2, "tp"].iloc[0])
        out.append(
            {
                "conf": conf,
                "recall": round(found / len(truth), 4),
                "found": found,
                "boxes_per_image": round(len(p) / len(images), 1),
            }
        )
    return out


def teacher_other(auto, truth, names: dict[int, str]) -> dict:
    """Of the true objects an auto box found (the best-IoU box, ≥ 0.5): named "other", named right; per class."""
    import torch
    from torchvision.ops import box_iou

    cols = ["x1", "y1", "x2", "y2"]
    per: dict[int, list[int]] = {}
    by_image = dict(tuple(auto.groupby("sha256")))
    for sha, t in truth.groupby("sha256"):
        a = by_image.get(sha)
        if a is None:
            continue
        iou = box_iou(torch.tensor(t[cols].to_numpy(np.float64)), torch.tensor(a[cols].to_numpy(np.float64))).numpy()
        best = iou.argmax(1)
        for k, (cls, j) in enumerate(zip(t["label_id"].tolist(), best.tolist(), strict=True)):
            if iou[k, j] >= 0.5:
                said = int(a["label_id"].iloc[j])
                per.setdefault(int(cls), []).append(0 if said == -1 else (1 if said == cls else 2))
    if not per:
        return {"found": 0, "other": None, "right": None, "per_class": {}}
    allv = np.concatenate([np.asarray(v) for v in per.values()])
    table = {
        names.get(c, str(c)): {
            "found": len(v),
            "other": round(float(np.mean(np.asarray(v) == 0)), 3),
            "right": round(float(np.mean(np.asarray(v) == 1)), 3),
        }
        for c, v in sorted(per.items())
    }
    return {
        "found": len(allv),
        "other": round(float(np.mean(allv == 0)), 3),
        "right": round(float(np.mean(allv == 1)), 3),
        "per_class": table,
    }


def prior_shift(auto, truth, num_classes: int, bar: float) -> list[dict]:
    """Accepted-label P/R with P(other) scaled by w, renormalised over the stored top-k."""
    from wanwu.quality import match_counts

    probs = np.zeros((len(auto), num_classes + 1))  # the last column: other
    for i, (ids, ps) in enumerate(zip(auto["topk_ids"], auto["topk_probs"], strict=True)):
        for c, p in zip(ids, ps, strict=False):
            probs[i, num_classes if c < 0 else int(c)] = p
    out = []
    for w in PRIORS:
        q = probs.copy()
        q[:, num_classes] *= w
        q /= np.clip(q.sum(1, keepdims=True), 1e-12, None)
        top, conf = q.argmax(1), q.max(1)
        keep = (top != num_classes) & (conf >= bar)
        pred = auto.loc[keep, ["sha256", "x1", "y1", "x2", "y2"]].assign(label_id=top[keep], confidence=conf[keep])
        m = match_counts(pred, truth)
        tp = int(m.loc[m["class_id"] >= 0, "tp"].sum())
        out.append(
            {
                "w_other": w,
                "precision": round(tp / max(len(pred), 1), 4),
                "recall": round(tp / len(truth), 4),
                "boxes": len(pred),
            }
        )
    return out


def teachers_alone(data: Path) -> list[dict]:
    """Each teacher's row of the autolabel stage's fusion table (metrics.json): how it treats the gold crops."""
    m = json.loads((data / "autolabel" / "metrics.json").read_text(encoding="utf-8"))
    rows = [r for r in (m.get("fusion_table") or {}).get("rows", []) if r.get("kind") in ("teacher", "single")]
    if not rows or "distractors_rejected" not in rows[0]:
        return [
            {
                "note": "the fusion table has no teacher rows with rejection figures (a run from before they were "
                "measured): delete data/autolabel/teachers/fusion.json and run the autolabel stage again"
            }
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from wanwu import contracts
    from wanwu.ontology import Ontology

    ap = argparse.ArgumentParser(prog="python -m bench.study_label_losses", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data"), help="the run's data folder")
    ap.add_argument(
        "--bar", type=float, default=0.5, help="accepted: top probability at least this (quality.min_auto_confidence)"
    )
    ap.add_argument("--iou", type=float, default=0.6, help="the proposer's NMS IoU (autolabel.iou)")
    args = ap.parse_args(argv)
    data = Path(args.data)
    need = [
        data / "collect" / "truth.parquet",
        data / "collect" / "manifest.parquet",
        data / "autolabel" / "labels.parquet",
    ]
    for f in need:
        if not f.is_file():
            raise SystemExit(f"{f}: not there. Run the pipeline on the built-in sample world first (`make run`).")
    t0 = time.perf_counter()
    labels = contracts.read("labels", need[2])
    auto = labels[labels["origin"] == "auto"].reset_index(drop=True)
    images = pd.read_parquet(need[1])
    images = images[images["split"].isin(["pool", "gold"]) & images["sha256"].isin(set(auto["sha256"]))]
    truth = contracts.read("labels", need[0])
    truth = truth[truth["sha256"].isin(set(images["sha256"])) & (truth["label_id"] >= 0)].reset_index(drop=True)
    if truth.empty:
        raise SystemExit(f"{data}: no auto-labeled pool or gold image with a true object: nothing to measure.")
    onto = Ontology.load(ROOT / "ontology.yaml")
    names = {i: onto.zh(i) for i in range(len(onto))}
    out = {
        "data": str(data),
        "images": len(images),
        "true_objects": len(truth),
        "proposer": proposer_recall(data, images, truth, args.iou),
        "teachers": teacher_other(auto, truth, names),
        "prior_shift": prior_shift(auto, truth, len(onto), args.bar),
        "teachers_alone": teachers_alone(data),
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "label_losses.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    md = [
        "# Where the auto labels lose the objects (`make label-losses`)",
        "",
        f"{out['images']} pool + gold images of `{data}`, {out['true_objects']} true objects (IoU 0.5).",
        "",
        "| proposer conf | objects found | boxes / image |",
        "|---|---|---|",
        *[f"| {r['conf']} | {r['recall']:.3f} | {r['boxes_per_image']} |" for r in out["proposer"] if "conf" in r],
        *[f"\n{r['note']}" for r in out["proposer"] if "note" in r],
        "",
        f"Of the {out['teachers']['found']} true objects an auto box found, the teachers named "
        f'**{out["teachers"]["other"]:.3f}** "other" and {out["teachers"]["right"]:.3f} right.'
        if out["teachers"]["found"]
        else "No auto box found a true object (IoU ≥ 0.5).",
        "",
        "| class | found | named other | named right |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v['found']} | {v['other']:.3f} | {v['right']:.3f} |"
            for k, v in out["teachers"]["per_class"].items()
        ],
        "",
        f"Accepted labels (object class, top probability ≥ {args.bar}) with P(other) scaled by w:",
        "",
        "| w | precision | recall | boxes |",
        "|---|---|---|---|",
        *[f"| {r['w_other']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['boxes']} |" for r in out["prior_shift"]],
        "",
        'Each teacher alone on the gold truth crops: its own classes\' objects named right / "other"; the other',
        'objects and the distractors it rejects (names "other"):',
        "",
        "| teacher | own objects | right | other | other objects rejected | distractors rejected |",
        "|---|---|---|---|---|---|",
        *[
            "| " + " | ".join([r["name"], *("—" if r[c] is None else str(r[c]) for c in TEACHER_COLUMNS)]) + " |"
            for r in out["teachers_alone"]
            if "name" in r
        ],
        *[f"\n{r['note']}" for r in out["teachers_alone"] if "note" in r],
        "",
    ]
    (RESULTS / "label_losses.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))
    print(f"→ {RESULTS / 'label_losses.md'} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
