"""Collect throughput and re-run cost, each against a baseline measured in the same run.

1. ``sample://?n=1000``: the default pipeline source, end to end (render, normalize, hash, store, tables), in
   images/s; baseline: the sample world rendering the same kind of scenes alone on one thread (what producing
   the pictures costs before collect does anything).
2. Re-running (1): seconds, as a ratio of the first run (goal ≤ 0.05: skip by source, render nothing).
3. A folder of 1,000 JPEG files (the stored images of (1), copied out): images/s; baseline: a plain
   single-threaded Pillow loop that opens, converts and re-saves each file (what a hand-written script does,
   without any of collect's checks, hashing or tables).
4. Re-running (3): seconds as a ratio of the first run (goal ≤ 0.05: unchanged files are not even opened).

Run ``python bench/bench_collect.py`` (prints the rows, writes bench/results/collect.json) or call :func:`bench`.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import row as _row  # noqa: E402  (after the path set-up, for `python bench/bench_x.py`)

N = 1000
WORLD = f"sample://?n={N}&seed=0&catalogue_train=0&catalogue_val=0&generic_train=0&generic_val=0"
BASELINE_SCENES = 150


def bench(tmp_dir: str | Path) -> list[dict]:
    from tasks import collect
    from wanwu import sample_world as sw
    from wanwu.config import CollectParams, ProjectParams, SourceSpec
    from wanwu.images import phash_hex
    from wanwu.ontology import Ontology

    tmp = Path(tmp_dir)
    ontology = Ontology.load(ROOT / "ontology.yaml")
    phash_hex(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32)))  # warm imports out of the timing
    rows: list[dict] = []

    # -- 1, 2: the sample world end to end
    spec = sw.WorldSpec.from_uri(WORLD)
    t = time.perf_counter()
    for i in range(BASELINE_SCENES):
        sw.render_scene(spec, i, ontology)
    render_rate = BASELINE_SCENES / (time.perf_counter() - t)

    project = ProjectParams(data_dir=tmp / "sample_data")
    params = CollectParams(sources=[SourceSpec(uri=WORLD)])
    first = collect.run(params, project, ontology)
    assert first.images_added == N, first
    rate = first.images_added / first.seconds
    rows.append(
        _row(
            "collect_sample_world_throughput",
            rate,
            "images/s",
            "render only, 1 thread",
            render_rate,
            rate / render_rate,
            ">= 0.8",
        )
    )
    again = collect.run(params, project, ontology)
    assert again.images_added == 0 and again.images_skipped == N, again
    rows.append(
        _row(
            "collect_sample_world_rerun",
            again.seconds,
            "s",
            "first run",
            first.seconds,
            again.seconds / first.seconds,
            "<= 0.05",
        )
    )

    # -- 3, 4: a folder of JPEG files
    folder = tmp / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted((project.data_dir / "raw").rglob("*.jpg"))):
        shutil.copyfile(p, folder / f"{i:05d}.jpg")
    files = sorted(folder.glob("*.jpg"))
    from PIL import Image

    t = time.perf_counter()
    for p in files:
        with Image.open(p) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=95)
    naive_rate = len(files) / (time.perf_counter() - t)

    fproject = ProjectParams(data_dir=tmp / "folder_data")
    fparams = CollectParams(sources=[SourceSpec(uri=str(folder))])
    ffirst = collect.run(fparams, fproject, ontology)
    assert ffirst.images_added == len(files), ffirst
    frate = ffirst.images_added / ffirst.seconds
    rows.append(
        _row(
            "collect_folder_throughput",
            frate,
            "images/s",
            "Pillow open+convert+save loop, 1 thread",
            naive_rate,
            frate / naive_rate,
            ">= 0.5",
        )
    )
    fagain = collect.run(fparams, fproject, ontology)
    assert fagain.images_added == 0, fagain
    rows.append(
        _row(
            "collect_folder_rerun",
            fagain.seconds,
            "s",
            "first run",
            ffirst.seconds,
            fagain.seconds / ffirst.seconds,
            "<= 0.05",
        )
    )
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-collect-") as tmp:
        rows = bench(tmp)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "collect.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for r in rows:
        print(
            f"{r['name']:36s} {r['value']:>10.3f} {r['unit']:9s} baseline {r['baseline_value']:>9.3f} "
            f"({r['baseline']}) ratio {r['ratio']:.3f} goal {r['goal']}"
        )


if __name__ == "__main__":
    main()
