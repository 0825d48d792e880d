"""Baseline versus distilled student on the gold set: same data, same run, three seeds (`make distill-study`).

Reads what the last `make run` left in data/: the quality dataset (train/val from auto + human labels, test =
the human gold set), the teacher's soft labels and the proposer the student starts from. For each seed:

* **train** — the train stage as params.yaml sets it (hard labels, from the proposer's weights);
* **fine-tune, alpha 0** — the distill stage from that baseline with the KD term switched off: the same extra
  epochs, schedule and data, so any difference to the next rows is the soft-label term and nothing else;
* **distill, alpha a** — the distill stage with the KD term at each alpha in ``--alphas`` (params.yaml's first).

Every checkpoint is scored by the evaluate stage's own function on the gold split at the evaluate stage's size (the
training size × evaluate.imgsz_scale; figures before that setting were at the training size).
Each arm writes into its own temporary project (links to the pipeline's inputs), so data/ is not touched.
Writes bench/results/distill_study.{json,md}. Nothing here asserts a figure: it reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _project(tmp: Path, links: dict[str, Path]) -> Any:
    from wanwu.config import ProjectParams

    data = tmp / "data"
    data.mkdir(parents=True)
    for name, target in links.items():
        os.symlink(target, data / name, target_is_directory=True)
    return ProjectParams(data_dir=data, ontology=ROOT / "ontology.yaml", seed=0, device="auto")


def _score(weights: Path, data_yaml: Path, imgsz: int) -> dict[str, float]:
    from wanwu import evaluation as ev

    m = ev.evaluate_model(weights, data_yaml, split="test", imgsz=imgsz, latency_runs=1, latency_warmup=0)
    return {"mAP50": round(float(m[ev.MAP50]), 4), "mAP50-95": round(float(m[ev.MAP]), 4)}


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        got = [r for r in rows if r["arm"] == arm]
        line: dict[str, Any] = {"arm": arm, "seeds": [r["seed"] for r in got]}
        for k in ("mAP50", "mAP50-95"):
            vals = [r[k] for r in got]
            line[k + "_mean"] = round(statistics.fmean(vals), 4)
            line[k + "_sd"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
        out.append(line)
    return out


def _markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Baseline versus distilled student (gold set)",
        "",
        f"Run {meta['started']} with `make distill-study` on {meta['cpu_count']} cores; data from the last "
        f"`make run` ({meta['train_images']} training images); {meta['train_epochs']} train epochs, then "
        f"{meta['distill_epochs']} fine-tune epochs, T = {meta['temperature']}, trained at {meta['imgsz']} px, "
        f"scored at {meta.get('scored_at', meta['imgsz'])} px; "
        f"{meta['seconds']:.0f} s in all.",
        "",
        "| arm | mAP50 mean ± sd | mAP50-95 mean ± sd | seeds |",
        "|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['arm']} | {s['mAP50_mean']:.4f} ± {s['mAP50_sd']:.4f} | "
            f"{s['mAP50-95_mean']:.4f} ± {s['mAP50-95_sd']:.4f} | {', '.join(map(str, s['seeds']))} |"
        )
    lines += ["", "| seed | arm | mAP50 | mAP50-95 | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['arm']} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.study_distill", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=None, help="KD weights (default: params.yaml's)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from wanwu.config import load_params
    from wanwu.offline import harden

    harden(ROOT)
    params = load_params(args.params)
    data = (ROOT / params.project.data_dir).resolve()
    data_yaml = data / "quality" / "dataset" / "data.yaml"
    for need in (data_yaml, data / "quality" / "soft_labels.parquet", data / "autolabel" / "proposer" / "best.pt"):
        if not need.is_file():
            print(f"{need}: not there. Run `make run` first: the study reuses its dataset and soft labels.")
            return 2
    alphas = args.alphas or [params.distill.alpha]
    from tasks import distill as distill_stage
    from tasks import train as train_stage
    from wanwu.evaluation import evaluated_imgsz

    size = evaluated_imgsz(params.evaluate, params.train.imgsz)  # every arm at the same size, as the stage does
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wanwu-distill-study-") as tmp:
        for seed in args.seeds:
            inputs = {"quality": data / "quality", "autolabel": data / "autolabel"}
            proj = _project(Path(tmp) / f"seed{seed}" / "train", inputs)
            t0 = time.perf_counter()
            base = train_stage.run(params.train.model_copy(update={"seed": seed}), proj)
            rows.append(
                {"seed": seed, "arm": "train (baseline)", **_score(Path(base.best), data_yaml, size)}
                | {"seconds": time.perf_counter() - t0}
            )
            for alpha in [0.0, *alphas]:
                arm = "fine-tune, alpha 0 (no KD)" if alpha == 0 else f"distill, alpha {alpha:g}"
                p = _project(Path(tmp) / f"seed{seed}" / f"alpha{alpha:g}", {**inputs, "train": Path(base.best).parent})
                t0 = time.perf_counter()
                res = distill_stage.run(params.distill.model_copy(update={"seed": seed, "alpha": alpha}), p)
                rows.append(
                    {"seed": seed, "arm": arm, **_score(Path(res.best), data_yaml, size)}
                    | {"seconds": time.perf_counter() - t0}
                )
                print(f"seed {seed} {arm}: {rows[-1]}", flush=True)
    summary = _summary(rows)
    n_train = len(list((data / "quality" / "dataset" / "images" / "train").glob("*")))
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - (time.perf_counter() - t_all))),
        "cpu_count": os.cpu_count(),
        "train_images": n_train,
        "train_epochs": params.train.epochs,
        "distill_epochs": params.distill.epochs,
        "temperature": params.distill.temperature,
        "imgsz": params.train.imgsz,
        "scored_at": size,
        "seconds": time.perf_counter() - t_all,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_study.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    md = _markdown(summary, rows, meta)
    (RESULTS / "distill_study.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
