"""The autolabel stage end to end on a tiny sample world: what a user checks after `wanwu stage autolabel`.

One module-scoped run trains a tiny proposer and the domain experts (1 epoch, tiny image sizes) and labels the
pool and gold images; the other tests reuse its models: the cache (0 model calls on a re-run), the merge knobs,
the Label Studio round trip, a SIGKILL in the middle of labeling, and the Prefect fan-out on threads and on a
local Dask cluster of 2 workers — each must give the same set of rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from wanwu import contracts, labeling

REPO = Path(__file__).resolve().parents[1]
WORLD = (
    "sample://?n=20&seed=3&size=96&seed_frac=0.3&catalogue_train=6&catalogue_val=2&catalogue_size=32&generic_train=6"
    "&generic_val=3"
)
TINY = {
    "conf": 0.0,  # a 1-epoch proposer scores low: keep its best boxes so every path has crops to label
    "max_det": 6,
    "shard_size": 3,
    "proposer_batch": 4,
    "runner": "local",
    "proposer_train": {"epochs": 1, "imgsz": 64, "batch": 8, "generic_train": None, "generic_val": 3, "seed_repeat": 1},
    "experts": {"epochs": 1, "imgsz": 16, "batch": 16, "other_from_domains": 3, "generic_other": 6, "seed_crops": 0.5},
    "fusion": {"other_crops": 6},
}


def load(root: Path, **over):
    from wanwu.config import load_params

    return load_params(root / "params.yaml", {f"autolabel.{k}": v for k, v in over.items()})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tasks import autolabel, collect

    root = tmp_path_factory.mktemp("autolabel")
    shutil.copy(REPO / "ontology.yaml", root / "ontology.yaml")
    (root / "params.yaml").write_text(
        yaml.safe_dump({"project": {"device": "cpu"}, "collect": {"sources": [WORLD]}, "autolabel": TINY}),
        encoding="utf-8",
    )
    params = load(root)
    collect.run(params.collect, params.project)
    t0 = time.perf_counter()
    result = autolabel.run(params.autolabel, params.project)
    return {"root": root, "params": params, "result": result, "seconds": time.perf_counter() - t0}


def rows(df: pd.DataFrame) -> set[tuple]:
    return {tuple(tuple(v) if isinstance(v, (list, np.ndarray)) else v for v in r) for r in df.itertuples(index=False)}


def test_labels_soft_labels_review_queue_and_metrics(world, ontology):
    r = world["result"]
    data = world["params"].project.data_dir
    manifest = contracts.read("manifest", data / "collect" / "manifest.parquet")
    labels = contracts.read("labels", r.labels)  # the contract holds
    wanted = set(manifest.loc[manifest["split"].isin(["pool", "gold"]), "sha256"])
    assert r.images == len(wanted) and r.labeled_images == len(wanted) and r.model_calls > 0
    assert len(labels) > 0 and set(labels["sha256"]) <= wanted
    assert (labels["origin"] == "auto").all()
    for _, g in labels.groupby("sha256"):
        assert sorted(g["box_id"]) == list(range(len(g)))  # box ids 0..n-1 per image
    top = np.array([p[0] for p in labels["topk_probs"]])
    for ids, probs in zip(labels["topk_ids"], labels["topk_probs"], strict=True):
        assert len(ids) == len(probs) == 5 and list(probs) == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-4
        assert all(-1 <= i < len(ontology) for i in ids)
    assert (labels.loc[top < 0.7, "needs_review"]).all()  # uncertain boxes are flagged
    # the proposer: class-aware over the ontology plus 物体, where the student will start from
    from ultralytics import YOLO

    names = YOLO(r.proposer).names
    assert names[0] == "猫" and len(names) == len(ontology) + 1
    # Label Studio import JSON
    tasks = json.loads(Path(r.review_tasks).read_text(encoding="utf-8"))
    assert len(tasks) == r.review_tasks_count == labels.loc[labels["needs_review"], "sha256"].nunique()
    for t in tasks:
        assert t["data"]["sha256"] in wanted and t["data"]["image"].endswith(".jpg")
        for res in t["predictions"][0]["result"]:
            v = res["value"]
            assert res["type"] == "rectanglelabels" and 0 <= v["x"] <= 100 and 0 < v["width"] <= 100
            assert v["rectanglelabels"][0] in {*ontology.names_zh.values(), "其他"}
    assert "猫" in (Path(r.review_tasks).parent / "config.xml").read_text(encoding="utf-8")
    # metrics.json: P/R vs truth overall and per class, and the fusion table
    m = json.loads(Path(r.metrics).read_text(encoding="utf-8"))
    pr = m["precision_recall"]
    assert set(pr["overall"]) >= {"precision", "recall", "tp", "predicted", "truth"} and pr["overall"]["truth"] > 0
    assert set(pr["per_class"]) == set(ontology.names_zh.values())
    names = {row["name"] for row in m["fusion_table"]["rows"]}
    assert {"vote", "weighted", "product", "stacked", "single all-domain model"} <= names
    # each expert's row says how it treats other domains' objects and the distractors (who is the weak rejector)
    experts = [row for row in m["fusion_table"]["rows"] if row["kind"] == "teacher"]
    assert experts and all(0 <= row["foreign_rejected"] <= 1 and row["own_objects"] > 0 for row in experts)
    assert all(0 <= row["distractors_rejected"] <= 1 for row in m["fusion_table"]["rows"])
    # the fused confidence is calibrated (autolabel.fusion.calibrate): the labeler uses the fitted temperature
    cal = m["fusion_table"]["calibration"]
    teacher = json.loads((data / "autolabel" / "teacher.json").read_text(encoding="utf-8"))
    assert cal["strategy"] == teacher["fusion"]["strategy"] and cal["temperature"] > 0
    assert teacher["fusion"]["temperature"] == pytest.approx(cal["temperature"], abs=1e-4)
    assert 0 <= cal["ece_after"] <= 1 and 0 <= cal["mean_confidence_after"] <= 1
    # the all-domain classifier is also one of the fused teachers (autolabel.fusion.include_single)
    assert m["teachers"]["names"][-1] == "全域" and len(m["teachers"]["names"]) >= 2
    # ... whose row in the table is the baseline's, once (not again as "全域 alone")
    kinds = [row["kind"] for row in m["fusion_table"]["rows"]]
    assert "全域 alone" not in names and kinds.count("single") == 1
    assert kinds.count("teacher") == len(m["teachers"]["names"]) - 1
    # every expert's validation top-1 is on record (these 1-epoch 16-px ones are near chance, and say so)
    experts = json.loads((data / "autolabel" / "teachers" / "experts.json").read_text(encoding="utf-8"))
    assert set(experts["val_top1"]) == set(experts["paths"]) and all(0 <= v <= 1 for v in experts["val_top1"].values())


def test_a_seed_image_trains_the_experts_or_fits_the_fusion_never_both(world, ontology):
    """The experts learn from scene crops of part of the seed; the fusion is fitted and calibrated on the rest."""
    from tasks import autolabel

    params = world["params"]
    data = params.project.data_dir
    inputs = autolabel.Inputs(data)
    seed = set(inputs.manifest.loc[inputs.manifest["split"] == "seed", "sha256"])
    human = inputs.human[inputs.human["sha256"].isin(seed)]
    experts_side = autolabel.seed_for_experts(inputs, params.autolabel.experts.seed_crops)
    fusion_side = autolabel.fusion_seed(params.autolabel, inputs)
    assert set(experts_side["sha256"]).isdisjoint(fusion_side["sha256"])
    assert len(experts_side) + len(fusion_side) == len(human)
    assert (experts_side["label_id"] >= 0).any() and (fusion_side["label_id"] >= 0).any()  # both sides have objects
    # an image keeps its side as the seed grows: the choice is by content hash, a larger share only adds images
    assert set(experts_side["sha256"]) <= set(autolabel.seed_for_experts(inputs, 0.9)["sha256"])
    assert autolabel.seed_for_experts(inputs, 0.0).empty
    # the fusion table was fitted on the fusion's side only (plus the generic "other" crops)
    m = json.loads((data / "autolabel" / "metrics.json").read_text(encoding="utf-8"))
    generic = list((data / "autolabel" / "teachers" / "generic_crops" / "val").glob("*.png"))  # as many as exist
    assert m["fusion_table"]["train_crops"] == len(fusion_side) + len(generic)
    # the experts' side became crops: every human box, and the proposer's boxes that match none as "other"
    experts = json.loads((data / "autolabel" / "teachers" / "experts.json").read_text(encoding="utf-8"))
    counts = experts["scene_crops"]
    assert counts["images"] == experts_side["sha256"].nunique()
    assert counts["objects"] == int((experts_side["label_id"] >= 0).sum()) and counts["other"] >= 0
    # ... and they train the all-domain model under their class (the val split stays the catalogue's)
    from wanwu.sample_world import class_folder

    train = data / "autolabel" / "teachers" / "data" / "_all" / "train"
    for cid, n in experts_side[experts_side["label_id"] >= 0]["label_id"].value_counts().items():
        assert len(list((train / class_folder(ontology[int(cid)].en)).glob("scene_*"))) == n
    assert not list((train.parent / "val").glob("*/scene_*"))


def test_scene_crops_go_to_an_expert_under_its_class_or_as_other(tmp_path, ontology):
    """A domain expert files its own classes' crops under them, the rest as other (capped so "other" does not
    outweigh its classes); the all-domain model takes every crop."""
    from PIL import Image

    from wanwu.models import teachers as tz
    from wanwu.ontology import OTHER_ID
    from wanwu.sample_world import class_folder

    cat = tmp_path / "catalogue"
    by_domain: dict[str, list] = {}
    for c in ontology.classes:
        by_domain.setdefault(c.domain, []).append(c)
        for split in ("train", "val"):
            d = cat / c.domain / split / class_folder(c.en)
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(d / "0.png")
    crops: dict[int, list] = {}
    for c in ontology.classes:  # three scene crops of every class, two unmatched proposer boxes
        crops[c.id] = []
        for i in range(3):
            crops[c.id].append(tmp_path / "scene" / f"{c.id}_{i}.png")
    crops[OTHER_ID] = [tmp_path / "scene" / f"o_{i}.png" for i in range(2)]
    for files in crops.values():
        for f in files:
            f.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(f)
    generic = {"train": [tmp_path / "scene" / "o_0.png"]}  # one generic-corpus "other" crop per expert
    out = tz.build_expert_datasets(
        cat, tmp_path / "data", generic, other_from_domains=4, in_domain=crops, ontology=ontology
    )
    domain = sorted(by_domain)[0]
    mine, others = by_domain[domain], [d for d in by_domain if d != domain]
    train = out[domain] / "train"
    for c in mine:
        assert len(list((train / class_folder(c.en)).glob("scene_*"))) == 3
    # other: as many unmatched boxes as generic crops (1 of 2), 4 crops per other domain (each has ≥ 6)
    assert len(list((train / "other").glob("scene_*"))) == 1 + 4 * len(others)
    assert not list((out[domain] / "val").rglob("scene_*"))
    all_train = out["_all"] / "train"
    assert all(len(list((all_train / class_folder(c.en)).glob("scene_*"))) == 3 for c in ontology.classes)
    assert len(list((all_train / "other").glob("scene_*"))) == 2  # the all-domain model: every unmatched box


def test_an_expert_at_chance_gets_a_warning_with_the_fix():
    from tasks.autolabel import _chance_warning

    warning = _chance_warning("动物", 0.21, 5)  # what lr0 0.002 at 32 px gave on the sample world
    assert warning is not None and "动物" in warning and "autolabel.experts.lr0" in warning
    assert _chance_warning("动物", 0.76, 5) is None  # the defaults now
    assert _chance_warning("动物", None, 5) is None  # no results.csv: nothing to judge


def test_rerun_with_unchanged_models_calls_no_model(world):
    """`wanwu stage autolabel` again: nothing retrained, every image from the cache, an MLflow run that says so."""
    import mlflow

    from tasks import autolabel

    r1 = world["result"]
    before = {p: p.stat().st_mtime_ns for p in Path(world["params"].project.data_dir, "autolabel").rglob("best.pt")}
    r2 = autolabel.run_stage(world["params"])  # its time against the first run is measured in bench/, not here
    assert r2.model_calls == 0 and r2.cached_images == r2.images and r2.labeled_images == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing retrained
    assert rows(contracts.read("labels", r2.labels)) == rows(contracts.read("labels", r1.labels))
    run = mlflow.search_runs(
        experiment_names=["wanwu"],
        filter_string="tags.`wanwu.stage` = 'autolabel'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    assert run["metrics.model_calls"].iloc[0] == 0 and run["status"].iloc[0] == "FINISHED"


def test_the_fused_teacher_serves_the_cascade(world, ontology):
    from PIL import Image

    from wanwu.models.teachers import from_params

    teacher = from_params(world["params"])  # what serve.cascade_teacher: wanwu.models.teachers:from_params loads
    crops = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (20, 20), (10, 200, 10))]
    p = teacher.predict_proba(crops)
    assert p.shape == (2, len(ontology) + 1)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)


def test_merge_knobs_apply_without_model_calls(world):
    from tasks import autolabel

    strict = load(world["root"], review_threshold=1.0, teacher_threshold=0.0)
    r = autolabel.run(strict.autolabel, strict.project)
    labels = contracts.read("labels", r.labels)
    assert r.model_calls == 0 and labels["needs_review"].all()
    assert (labels["label_id"] == [ids[0] for ids in labels["topk_ids"]]).all()  # teacher always wins at 0
    autolabel.run(world["params"].autolabel, world["params"].project)  # back to the defaults


def test_reviewed_labels_come_back_as_human_labels_and_win(world, tmp_path, ontology):
    from tasks import autolabel

    r = world["result"]
    tasks = json.loads(Path(r.review_tasks).read_text(encoding="utf-8"))
    assert tasks, "the tiny world should have uncertain boxes"
    # a reviewer fixes the first task: keeps its first box, renames it 东京塔; rejects the second task's boxes
    first = tasks[0]
    box = dict(first["predictions"][0]["result"][0])
    box["value"] = {**box["value"], "rectanglelabels": ["东京铁塔"]}  # a synonym: looked up, not compared
    export = [{"id": 1, "data": first["data"], "annotations": [{"id": 7, "result": [box], "was_cancelled": False}]}]
    if len(tasks) > 1:
        export.append(
            {"id": 2, "data": tasks[1]["data"], "annotations": [{"id": 8, "result": [], "was_cancelled": False}]}
        )
    (tmp_path / "export.json").write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")
    p = load(world["root"], review_imports=[str(tmp_path / "export.json")])
    r2 = autolabel.run(p.autolabel, p.project)
    labels = contracts.read("labels", r2.labels)
    assert r2.model_calls == 0
    mine = labels[labels["sha256"] == first["data"]["sha256"]]
    assert len(mine) == 1 and mine["origin"].tolist() == ["human"] and mine["label_id"].tolist() == [13]
    v = box["value"]
    w = box["original_width"]
    assert mine["x1"].iloc[0] == pytest.approx(v["x"] * w / 100, abs=0.01)
    if len(tasks) > 1:
        assert (labels["sha256"] != tasks[1]["data"]["sha256"]).all()  # reviewed: no objects
    before = contracts.read("labels", r.labels)
    untouched = set(before["sha256"]) - {t["data"]["sha256"] for t in tasks[:2]}
    assert rows(labels[labels["sha256"].isin(untouched)]) == rows(before[before["sha256"].isin(untouched)])
    autolabel.run(world["params"].autolabel, world["params"].project)


# ---- kill and resume; fan-out runners ---------------------------------------------------------------------


def spec_and_items(world, parts_dir: Path) -> tuple[labeling.LabelerSpec, list[tuple[str, str]]]:
    data = world["params"].project.data_dir
    vdir = next((data / "autolabel" / "parts").iterdir())
    spec = labeling.LabelerSpec.model_validate_json((vdir / "spec.json").read_text())
    spec = spec.model_copy(update={"parts_dir": str(parts_dir)})
    m = contracts.read("manifest", data / "collect" / "manifest.parquet")
    m = m[m["split"].isin(["pool", "gold"])]
    return spec, list(zip(m["sha256"], m["path"], strict=True))


def assembled(spec: labeling.LabelerSpec, items, out: Path) -> set[tuple]:
    labeling.assemble(spec.version_dir(), [s for s, _ in items], out)
    return rows(contracts.read("labels", out))


KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from wanwu.offline import harden
    harden(sys.argv[3])
    from wanwu import labeling
    spec = labeling.LabelerSpec.model_validate_json(open(sys.argv[1]).read())
    items = [tuple(x) for x in json.load(open(sys.argv[2]))]

    def slow(spec, shards):  # the test's pace: time to kill between two shards' parts
        out = []
        for s in shards:
            out.append(labeling.label_shard(spec, s))
            print("part", flush=True)
            time.sleep(0.4)
        return out

    labeling.run_shards(spec, items, shard_size=2, map_fn=slow)
    """
)


def test_sigkill_mid_run_then_resume_gives_the_rows_of_an_uninterrupted_run(world, tmp_path):
    spec, items = spec_and_items(world, tmp_path / "killed")
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    total = len(labeling.make_shards(items, len(items), 2))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "kill.py"),
            str(tmp_path / "spec.json"),
            str(tmp_path / "items.json"),
            str(REPO),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    vdir = spec.version_dir()
    deadline = time.time() + 120
    while len(list(vdir.glob("*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(vdir.glob("*.parquet")))
    assert proc.returncode == -signal.SIGKILL and 0 < done < total, (done, total)

    resumed = labeling.run_shards(spec, items, shard_size=2)
    assert resumed.cached_images > 0 and resumed.shards == total - done  # only the missing shards
    clean_spec, _ = spec_and_items(world, tmp_path / "clean")
    labeling.run_shards(clean_spec, items, shard_size=2)
    killed_rows = assembled(spec, items, tmp_path / "a.parquet")
    assert killed_rows == assembled(clean_spec, items, tmp_path / "b.parquet")  # no duplicate, no lost row
    assert not list(vdir.glob(".*.tmp"))  # the killed writer's temp file was cleaned up


def test_prefect_fan_out_on_threads_and_a_local_dask_cluster_of_two_workers(world, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from tasks.autolabel import prefect_map

    local_spec, items = spec_and_items(world, tmp_path / "local")
    labeling.run_shards(local_spec, items, shard_size=3)
    expected = assembled(local_spec, items, tmp_path / "local.parquet")
    with prefect_test_harness(server_startup_timeout=120):
        for runner in ("threads", "dask"):
            spec, _ = spec_and_items(world, tmp_path / runner)
            stats = labeling.run_shards(spec, items, shard_size=3, map_fn=prefect_map(runner, workers=2))
            assert stats.labeled_images == len(items) and stats.shards > 2 and stats.model_calls > 0, runner
            assert assembled(spec, items, tmp_path / f"{runner}.parquet") == expected, runner


def test_the_seed_boxes_hash_ignores_numpy_print_options():
    """The experts' and the fusion's cache keys hash the seed boxes; ultralytics changes numpy's print options on
    import, which made the first run's key differ from every later one (the experts retrained for nothing)."""
    import numpy as np
    import pandas as pd

    from tasks.autolabel import _frame_hash

    boxes = pd.DataFrame(
        {
            "sha256": ["a", "b"],
            "x1": [1.0, 2.5],
            "topk_ids": [np.array([5], np.int32), np.array([6, -1], np.int32)],
            "topk_probs": [np.array([1.0], np.float32), np.array([0.75, 0.25], np.float32)],
        }
    )
    plain = _frame_hash(boxes)
    with np.printoptions(linewidth=320, formatter={"float_kind": "{:11.5g}".format}):  # what ultralytics sets
        assert _frame_hash(boxes) == plain
    changed = boxes.copy()
    changed.at[1, "topk_probs"] = np.array([0.7, 0.3], np.float32)
    assert _frame_hash(changed) != plain  # still a hash of the content
    assert _frame_hash(boxes.rename(columns={"x1": "x2"})) != plain
    nullable = boxes.assign(flag=pd.array([True, None], dtype="boolean"))  # pd.NA is no json value: its text
    assert _frame_hash(nullable) == _frame_hash(nullable.copy()) != plain
