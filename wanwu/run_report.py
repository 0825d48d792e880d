"""The run report: one HTML page per pipeline run, linked from the pipeline's MLflow run.

It reads what the stages wrote under ``data/`` (each stage's metrics and decision files) and shows, on one page,
the stage timings, data counts, auto-label quality, the evaluation of every candidate and the champion, example
detections drawn with Chinese labels, and the promotion decision with its reason. Stages that did not run are
said to be missing, not silently left out.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wanwu.models.fusion import describe_calibration
from wanwu.report import Section, badge, esc, fmt, kv_table, save_figure, setup_plotting, table_html, write_page


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _missing(stage: str) -> Section:
    return Section(stage, note=f"The {stage} stage did not run in this pipeline run (or wrote no figures).")


def _timings(timings: dict[str, float]) -> Section:
    rows = [{"stage": s, "seconds": round(t, 1)} for s, t in timings.items()]
    rows.append({"stage": "total", "seconds": round(sum(timings.values()), 1)})
    return Section("Stage timings", table_html(rows, ["stage", "seconds"]))


def _data(data_dir: Path) -> Section:
    import pandas as pd

    manifest = data_dir / "collect" / "manifest.parquet"
    if not manifest.is_file():
        return _missing("collect")
    m = pd.read_parquet(manifest, columns=["split"])
    counts: dict[str, Any] = {"images": len(m)}
    counts.update({f"images ({k})": int(v) for k, v in m["split"].value_counts().sort_index().items()})
    rejects = data_dir / "collect" / "rejects.parquet"
    if rejects.is_file():
        r = pd.read_parquet(rejects, columns=["reason"])
        counts["rejected"] = len(r)
        counts.update({f"rejected: {k}": int(v) for k, v in r["reason"].value_counts().items()})
    for name in ("human_labels", "truth"):
        p = data_dir / "collect" / f"{name}.parquet"
        if p.is_file():
            counts[f"{name.replace('_', ' ')} boxes"] = len(pd.read_parquet(p, columns=["sha256"]))
    labels = data_dir / "autolabel" / "labels.parquet"
    if labels.is_file():
        lab = pd.read_parquet(labels, columns=["needs_review"])
        counts["auto-labelled boxes"] = len(lab)
        counts["boxes needing review"] = int(lab["needs_review"].sum())
    splits = data_dir / "quality" / "splits.parquet"
    if splits.is_file():
        s = pd.read_parquet(splits)
        counts.update({f"dataset {k}": int(v) for k, v in s["split"].value_counts().sort_index().items()})
    return Section("Data", kv_table(counts))


def _pr_line(title: str, pr: dict[str, Any]) -> str:
    return (
        f"<p>{esc(title)}: precision <b>{fmt(pr.get('precision'))}</b>, recall <b>{fmt(pr.get('recall'))}</b> "
        f"({fmt(pr.get('tp'))} right of {fmt(pr.get('predicted'))} boxes; {fmt(pr.get('reference'))} objects).</p>"
    )


def _label_quality(data_dir: Path) -> Section:
    q = _json(data_dir / "quality" / "metrics.json") or {}
    a = _json(data_dir / "autolabel" / "metrics.json") or {}
    if not (q or a):
        return _missing("autolabel / quality")
    body = []
    pr = q.get("autolabel") or {}
    ref = pr.get("reference", "truth")
    if isinstance(pr.get("all"), dict):
        body.append(
            _pr_line(f"All auto labels against the {ref} (IoU ≥ {pr.get('iou', 0.5)} and the right class)", pr["all"])
        )
        if isinstance(pr.get("accepted"), dict):
            body.append(_pr_line("Auto labels that entered the dataset (not flagged for review)", pr["accepted"]))
        per_class = pr["all"].get("per_class") or {}
        rows = [{"id": k, **v} for k, v in per_class.items() if isinstance(v, dict)]
        if rows:
            body.append(table_html(rows, ["id", "name", "precision", "recall", "tp", "predicted", "reference"]))
    fusion = a.get("fusion_table")
    rows = fusion.get("rows") if isinstance(fusion, dict) else fusion
    if isinstance(rows, list) and rows:
        body.append("<h3>Teachers and their fusion on gold crops (accuracy)</h3>")
        body.append(table_html(rows))
        cal = describe_calibration(fusion.get("calibration") if isinstance(fusion, dict) else None)
        if cal:
            body.append(f"<p>The boxes were named by the {esc(cal)}.</p>")
    gate = q.get("passed")
    if gate is not None:
        body.append(f"<p>Quality gate: {badge(bool(gate))}</p>")
    report = data_dir / "quality" / "report" / "index.html"
    if report.is_file():
        body.append(f'<p><a href="{esc(report.as_uri())}">The full quality report</a></p>')
    return Section("Label quality", "".join(body))


def _evaluation(data_dir: Path) -> Section:
    ev = _json(data_dir / "evaluate" / "metrics.json")
    if not ev:
        return _missing("evaluate")
    rows = []
    for name, m in (ev.get("models") or {}).items():
        if not isinstance(m, dict):
            continue
        rows.append(
            {
                "model": name,
                "version": m.get("version"),
                "mAP50": m.get("mAP50"),
                "mAP50-95": m.get("mAP50-95"),
                "latency p50 ms": m.get("latency_ms_p50"),
                "latency p95 ms": m.get("latency_ms_p95"),
            }
        )
    gold = ev.get("gold") or {}
    figures = [(p, p.stem.replace("_", " ")) for p in sorted((data_dir / "evaluate").rglob("*confusion*.png"))[:2]]
    return Section(f"Evaluation on the gold set ({gold.get('images', '?')} images)", table_html(rows), figures=figures)


def _decision(data_dir: Path) -> Section:
    d = _json(data_dir / "promote" / "decision.json")
    if not d:
        return _missing("promote")
    ok = d.get("decision") == "promoted"
    body = [f"<p>{badge(ok, d.get('decision', '?'))} version {esc(d.get('version'))}: {esc(d.get('reason'))}</p>"]
    checks = d.get("checks")
    if isinstance(checks, list) and checks:
        body.append(table_html(checks))
    body.append(f"<p>Champion after this run: version <b>{esc(d.get('champion_after'))}</b>.</p>")
    return Section("Promotion decision", "".join(body))


def _detections(data_dir: Path, out_dir: Path, n: int = 4) -> Section:
    """The best candidate on a few gold images at the evaluated size, drawn by ultralytics (Chinese names in the CJK
    font). Before an evaluation: distill's checkpoint, else train's, at their training size."""
    ev = _json(data_dir / "evaluate" / "metrics.json") or {}
    best = Path((ev.get("models", {}).get(ev.get("best")) or {}).get("weights", ""))
    order = (best, data_dir / "distill" / "best.pt", data_dir / "train" / "best.pt")
    weights = next((p for p in order if p.suffix == ".pt" and p.is_file()), None)
    imgsz = (ev.get("gold") or {}).get("imgsz") if weights == best else None
    test_dir = data_dir / "quality" / "dataset" / "images" / "test"
    if weights is None or not test_dir.is_dir():
        return _missing("train")
    from PIL import Image
    from ultralytics import YOLO

    images = sorted(test_dir.glob("*.jpg"))[:n]
    model = YOLO(str(weights))
    figures = []
    for i, img in enumerate(images):
        res = model.predict(str(img), conf=0.25, verbose=False, device="cpu", **({"imgsz": imgsz} if imgsz else {}))[0]
        plotted = res.plot(pil=True, line_width=1, font_size=11)  # Chinese names need ultralytics' PIL drawing
        path = out_dir / f"detections_{i}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        (plotted if isinstance(plotted, Image.Image) else Image.fromarray(plotted[..., ::-1])).save(path)
        figures.append((path, f"{weights.parent.name} on gold image {img.stem[:10]}"))
    return Section("Example detections (gold images)", figures=figures)


def _timing_figure(timings: dict[str, float], out_dir: Path) -> Path | None:
    if not timings:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * len(timings) + 1))
    ax.barh(list(timings)[::-1], list(timings.values())[::-1], color="#4a7")
    ax.set_xlabel("秒 seconds")
    ax.set_title("各阶段耗时 stage timings")
    return save_figure(fig, out_dir / "timings.png")


def write(data_dir: Path, root: Path, timings: dict[str, float], run_id: str | None = None) -> Path:
    """Write ``reports/<UTC time>/index.html`` for this run and return its path."""
    setup_plotting(root)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = root / "reports" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [_timings(timings)]
    fig = _timing_figure(timings, out_dir)
    if fig is not None:
        sections[0].figures.append((fig, "stage timings"))
    sections += [_data(data_dir), _label_quality(data_dir), _evaluation(data_dir)]
    try:
        sections.append(_detections(data_dir, out_dir))
    except Exception as e:  # a report never fails the run it reports on
        sections.append(Section("Example detections", note=f"could not draw detections: {e}"))
    sections.append(_decision(data_dir))
    subtitle = f"MLflow run {run_id}" if run_id else ""
    page = write_page(out_dir / "index.html", "万物 wanwu · pipeline run", sections, subtitle=subtitle)
    latest = root / "reports" / "latest.html"
    latest.write_text(
        f'<meta http-equiv="refresh" content="0; url={stamp}/index.html"><a href="{stamp}/index.html">{stamp}</a>',
        encoding="utf-8",
    )
    return page
