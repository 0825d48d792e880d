"""The quality stage end to end (real great-expectations, torchvision, cleanlab, matplotlib) and its parts.

The world is tests/_quality_world.py: collect and autolabel tables with known truth, written where those stages
write them. What a user checks: a dataset ultralytics can read with Chinese names; the boxes in it are exactly the
soft-label rows in label-file order; gold is the test split; splits never move when data is added; a failed gate
leaves no dataset and keeps the last reference; the worst labels reach the review queue.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _quality_world import make_world, merge, save

from tasks import quality as tq
from wanwu import contracts
from wanwu import quality as q
from wanwu.config import ProjectParams, QualityParams

REPO = Path(__file__).resolve().parents[1]
P = QualityParams(min_images_per_class=3, max_class_imbalance=10)


def _project(tmp_path: Path) -> ProjectParams:
    return ProjectParams(data_dir=tmp_path / "data", ontology=REPO / "ontology.yaml")


@pytest.fixture(scope="module")
def passed(tmp_path_factory):
    """One passing run on a 40-image world (shared by the tests that only read its outputs)."""
    tmp = tmp_path_factory.mktemp("qstage")
    project = _project(tmp)
    world = make_world(project.data_dir, 40, classes=(0, 1, 2), seed=11)
    result = tq.run(P, project, track=False)
    return project, world, result


def test_stage_writes_an_ultralytics_dataset_with_chinese_names(passed, ontology):
    project, _, result = passed
    assert result.passed and result.expectations == 25
    spec = yaml.safe_load(Path(result.data_yaml).read_text(encoding="utf-8"))
    assert Path(spec["path"]).is_absolute() and Path(spec["path"]) == project.data_dir / "quality" / "dataset"
    assert spec["names"] == {c.id: c.zh for c in ontology.classes} and spec["names"][0] == "猫"
    assert (spec["train"], spec["val"], spec["test"]) == ("images/train", "images/val", "images/test")
    root = Path(spec["path"])
    for split in ("train", "val", "test"):
        imgs = sorted(p.stem for p in (root / "images" / split).iterdir())
        labels = sorted(p.stem for p in (root / "labels" / split).glob("*.txt"))
        assert imgs == labels and len(imgs) == result.images[split] > 0
    # hard links into data/raw, not copies (the painted ones, next test, are PNGs)
    one = next((root / "images" / "train").glob("*.jpg"))
    raw = project.data_dir / "raw" / one.stem[:2] / one.name
    assert os.path.samefile(one, raw)


def test_unsure_auto_boxes_are_painted_grey_and_everything_else_is_the_raw_image(passed):
    from PIL import Image

    project, _, result = passed
    root = project.data_dir / "quality" / "dataset"
    metrics = json.loads(Path(result.metrics).read_text())
    labels = pd.read_parquet(project.data_dir / "autolabel" / "labels.parquet")
    soft = contracts.read("labels", result.soft_labels)
    splits = dict(pd.read_parquet(result.splits).to_numpy())
    painted = sorted((root / "images").rglob("*.png"))
    assert painted and metrics["counts"]["ignore_images"] == len(painted)
    assert not list((root / "images" / "test").glob("*.png"))  # the gold set is never touched
    checked = 0
    for png in painted:
        sha = png.stem
        assert splits[sha] in ("train", "val") and (root / "labels" / splits[sha] / f"{sha}.txt").is_file()
        raw = np.asarray(Image.open(project.data_dir / "raw" / sha[:2] / f"{sha}.jpg").convert("RGB")).astype(int)
        got = np.asarray(Image.open(png).convert("RGB")).astype(int)
        unsure = labels[(labels["sha256"] == sha) & labels["needs_review"] & (labels["label_id"] >= 0)]
        kept = soft[soft["sha256"] == sha]
        covered = np.zeros(raw.shape[:2], bool)
        for b in unsure.itertuples():
            covered[int(b.y1) : int(np.ceil(b.y2)), int(b.x1) : int(np.ceil(b.x2))] = True
        kept_mask = np.zeros_like(covered)
        for b in kept.itertuples():
            kept_mask[int(b.y1) : int(np.ceil(b.y2)), int(b.x1) : int(np.ceil(b.x2))] = True
        grey = covered & ~kept_mask
        assert grey.any() and (got[grey] == q.IGNORE_FILL).all()  # the unsure spots: grey
        assert (got[~grey] == raw[~grey]).all()  # every other pixel, kept boxes included: the raw image, lossless
        checked += 1
    assert checked == len(painted)


def test_label_files_match_soft_labels_line_for_line(passed):
    project, _, result = passed
    soft = contracts.read("labels", result.soft_labels)
    splits = pd.read_parquet(result.splits)
    assert list(splits.columns) == ["sha256", "split"]
    root = project.data_dir / "quality" / "dataset"
    split_of = dict(zip(splits["sha256"], splits["split"], strict=True))
    n_lines = 0
    for sha, split in split_of.items():
        lines = (root / "labels" / split / f"{sha}.txt").read_text().splitlines()
        rows = soft[soft["sha256"] == sha]
        assert list(rows["box_id"]) == list(range(len(lines)))  # box_id = line number
        assert [int(ln.split()[0]) for ln in lines] == list(rows["label_id"])
        for ln in lines:
            cx, cy, w, h = map(float, ln.split()[1:])
            assert cx - w / 2 + 1e-6 >= 0 and cx + w / 2 - 1e-6 <= 1 and 0 < w <= 1
            assert cy - h / 2 + 1e-6 >= 0 and cy + h / 2 - 1e-6 <= 1 and 0 < h <= 1
        n_lines += len(lines)
    assert n_lines == len(soft) == sum(result.boxes.values())
    # human boxes carry one-hot soft labels; auto boxes their teacher's top-k
    human = soft[soft["origin"] == "human"]
    assert all(list(t) == [c] for t, c in zip(human["topk_ids"], human["label_id"], strict=True))
    assert all(list(p) == [1.0] for p in human["topk_probs"])
    assert (soft.loc[soft["origin"] == "auto", "topk_ids"].map(len) > 1).any()


def test_gold_is_the_test_split_with_human_labels_only(passed):
    _, world, result = passed
    splits = pd.read_parquet(result.splits)
    gold = set(world.manifest.loc[world.manifest["split"] == "gold", "sha256"])
    assert set(splits.loc[splits["split"] == "test", "sha256"]) == gold
    soft = contracts.read("labels", result.soft_labels)
    assert set(soft.loc[soft["sha256"].isin(gold), "origin"]) == {"human"}  # human wins over auto on gold
    # labels the dataset must not hold: other (−1), needs_review, duplicates
    assert (soft["label_id"] >= 0).all()
    auto_in = soft[soft["origin"] == "auto"]
    assert not auto_in["needs_review"].any()
    metrics = json.loads(Path(result.metrics).read_text())
    left = metrics["counts"]["boxes_left_out"]
    assert left["needs_review"] > 0 and left["other"] > 0 and left["overridden_by_human"] > 0
    assert left.get("duplicate", 0) > 0


def test_metrics_report_and_reference(passed):
    project, _, result = passed
    m = json.loads(Path(result.metrics).read_text())
    assert m["passed"] and m["failed"] == [] and len(m["expectations"]) == 25
    assert m["drift"]["psi"] is None and "first accepted run" in m["drift"]["note"]
    pr = m["autolabel"]
    assert pr["reference"] == "truth" and 0.5 < pr["accepted"]["precision"] <= 1 and 0.3 < pr["all"]["recall"] <= 1
    assert set(pr["accepted"]["per_class"]) == {"0", "1", "2"} and pr["accepted"]["per_class"]["0"]["name"] == "猫"
    html = Path(result.report).read_text(encoding="utf-8")
    assert "quality report" in html and 'href="gx/index.html"' in html and "猫" in html
    for fig in ("class_histogram", "box_sizes", "confidence", "autolabel_pr", "drift"):
        assert (Path(result.report).parent / "figures" / f"{fig}.png").stat().st_size > 5000
    assert (project.data_dir / "quality" / "report" / "gx" / "index.html").is_file()
    ref = json.loads((project.data_dir / "quality" / "reference.json").read_text())
    assert set(ref["features"]) == set(q.DRIFT_FEATURES) and abs(sum(ref["classes"].values()) - 1) < 1e-9


def test_second_run_drifts_and_fails_without_touching_the_accepted_state(tmp_path, ontology):
    project = _project(tmp_path)
    first = make_world(project.data_dir, 36, classes=(0, 1, 2), seed=5)
    tq.run(P, project, track=False)
    ref_path = project.data_dir / "quality" / "reference.json"
    ref_before = ref_path.read_text()
    # new, much darker pictures arrive
    dark = make_world(project.data_dir, 60, classes=(0, 1, 2), seed=6, start=1000, brightness=(5, 25), write=True)
    save(merge(first, dark))
    with pytest.raises(tq.QualityGateFailed) as info:
        tq.run(P, project, track=False)
    msg = str(info.value)
    assert "[drift_psi]" in msg and "brightness: psi=" in msg and "quality.drift_max_psi = 0.25" in msg
    assert not (project.data_dir / "quality" / "dataset").exists()  # nothing to train on
    assert not (project.data_dir / "quality" / "soft_labels.parquet").exists()
    assert ref_path.read_text() == ref_before  # the reference stays the last accepted dataset
    m = json.loads((project.data_dir / "quality" / "metrics.json").read_text())
    assert not m["passed"] and "drift_psi" in m["failed"] and m["drift"]["max_psi"] > 0.25
    assert "drift_psi" in (project.data_dir / "quality" / "report" / "index.html").read_text(encoding="utf-8")


# ---- parts ---------------------------------------------------------------------------------------------------
def _boxes(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["sha256", "x1", "y1", "x2", "y2", "label_id", "confidence"])


def test_nms_is_class_aware_and_per_image():
    b = _boxes(
        [
            ("a", 0, 0, 10, 10, 0, 0.9),
            ("a", 1, 0, 10, 10, 0, 0.8),  # same class, IoU 0.9: a duplicate
            ("a", 1, 0, 10, 10, 1, 0.7),  # other class at the same place: kept
            ("b", 1, 0, 10, 10, 0, 0.6),  # same box in another image: kept
            ("a", 20, 20, 30, 30, 0, 0.5),  # apart: kept
        ]
    )
    assert q.nms_keep(b, 0.7).tolist() == [True, False, True, True, True]
    assert q.nms_keep(b, 0.95).all()


def _shas(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("0123456789abcdef"), 64)) for _ in range(n)]


def test_splits_are_stable_when_data_is_added_and_follow_the_ratios():
    ratios = {"train": 0.6, "val": 0.2, "test": 0.2}
    old = pd.DataFrame({"sha256": _shas(1500, 1), "role": "pool", "phash": None})
    new = pd.DataFrame({"sha256": _shas(1500, 2), "role": "pool", "phash": None})
    gold = pd.DataFrame({"sha256": _shas(300, 3), "role": "gold", "phash": None})
    # without gold: 6:2:2
    a = q.assign_splits(old, ratios, 4)["split"].value_counts(normalize=True)
    assert abs(a["train"] - 0.6) < 0.04 and abs(a["val"] - 0.2) < 0.04 and abs(a["test"] - 0.2) < 0.04
    # with gold: gold is test, the rest 6:2 (train 75 %)
    both = pd.concat([old, gold], ignore_index=True)
    s1 = q.assign_splits(both, ratios, 4)
    assert (s1.loc[both["role"] == "gold", "split"] == "test").all()
    share = s1.loc[both["role"] == "pool", "split"].value_counts(normalize=True)
    assert set(share.index) == {"train", "val"} and abs(share["train"] - 0.75) < 0.04
    # add data: nobody moves
    grown = pd.concat([both, new], ignore_index=True)
    s2 = q.assign_splits(grown, ratios, 4)
    assert (s2["split"].iloc[: len(both)].to_numpy() == s1["split"].to_numpy()).all()
    # deterministic
    assert (q.assign_splits(grown, ratios, 4)["split"] == s2["split"]).all()


def test_splits_are_stratified_per_class_in_expectation():
    """Hash-based splits give every class the ratios up to sampling noise (the hash ignores the class)."""
    rng = np.random.default_rng(0)
    imgs = pd.DataFrame({"sha256": _shas(3000, 9), "role": "pool", "phash": None})
    imgs["cls"] = rng.integers(0, 5, len(imgs))
    imgs["split"] = q.assign_splits(imgs, {"train": 0.6, "val": 0.2, "test": 0.2}, 4)["split"]
    shares = pd.crosstab(imgs["cls"], imgs["split"], normalize="index")
    assert (shares["train"].sub(0.6).abs() < 0.05).all() and (shares["val"].sub(0.2).abs() < 0.05).all()


def test_near_duplicates_share_a_split_and_copies_of_gold_are_left_out():
    base = "8f373714b7a1dfd2"
    near = "8f373714b7a1dfd3"  # one bit away
    far = "0000ffff0000ffff"
    shas = _shas(5, 4)
    imgs = pd.DataFrame(
        {
            "sha256": shas,
            "role": ["pool", "pool", "seed", "gold", "pool"],
            "phash": [base, near, far, far[:-1] + "e", "1" * 16],
        }
    )
    s = q.assign_splits(imgs, {"train": 0.6, "val": 0.2, "test": 0.2}, 4)
    assert s.loc[0, "split"] == s.loc[1, "split"] and s.loc[0, "group"] == s.loc[1, "group"] == min(shas[0], shas[1])
    assert s.loc[2, "excluded"] == "near_duplicate_of_gold" and s.loc[2, "split"] == ""
    assert s.loc[3, "split"] == "test"


def test_psi_is_zero_for_the_same_data_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    ref = q.reference_stats({"brightness": rng.normal(120, 20, 2000)}, {"0": 0.5, "1": 0.5}, 10, 2000)
    same = q.drift_rows(ref, {"brightness": rng.normal(120, 20, 2000)}, {"0": 0.5, "1": 0.5})
    shifted = q.drift_rows(ref, {"brightness": rng.normal(60, 20, 2000)}, {"0": 0.9, "1": 0.1})
    assert all(r["psi"] < 0.05 for r in same)
    by = {r["feature"]: r["psi"] for r in shifted}
    assert by["brightness"] > 1 and by["class_distribution"] > 0.25
    assert q.drift_rows(None, {"brightness": np.ones(3)}, {}) == []


def test_autolabel_precision_recall_against_truth_and_against_gold(ontology):
    man = pd.DataFrame({"sha256": ["g", "p"], "split": ["gold", "pool"]})
    truth = _boxes(
        [("g", 0, 0, 10, 10, 0, 1), ("g", 20, 20, 30, 30, 1, 1), ("p", 0, 0, 10, 10, 2, 1), ("p", 40, 40, 50, 50, 0, 1)]
    )
    auto = _boxes(
        [
            ("g", 0, 0, 10, 10, 0, 0.9),  # right
            ("g", 20, 20, 30, 30, 2, 0.8),  # right place, wrong class
            ("p", 0, 0, 10, 11, 2, 0.7),  # right
            ("p", 60, 60, 70, 70, 1, 0.6),  # nothing there
        ]
    ).assign(passes=[True, True, True, False])
    pr = q.autolabel_pr(q.Inputs(man, truth.iloc[0:0], auto, truth), auto, ontology)
    assert pr["reference"] == "truth"
    assert (pr["all"]["precision"], pr["all"]["recall"]) == (0.5, 0.5)
    assert pr["all"]["localisation"]["precision"] == 0.75  # class-agnostic: only the empty box is wrong
    assert (pr["accepted"]["precision"], pr["accepted"]["recall"]) == (round(2 / 3, 4), 0.5)
    assert pr["all"]["per_class"]["2"] == {
        "name": "鸟",
        "precision": 0.5,
        "recall": 1.0,
        "tp": 1,
        "predicted": 2,
        "reference": 1,
    }
    # no truth: the human gold labels are the reference, on gold images only
    gold_human = truth[truth["sha256"] == "g"]
    pr = q.autolabel_pr(q.Inputs(man, gold_human, auto, None), auto, ontology)
    assert (
        pr["reference"] == "gold" and pr["images"] == 1 and (pr["all"]["precision"], pr["all"]["recall"]) == (0.5, 0.5)
    )


def test_a_wrong_gold_label_is_scored_worst_and_reaches_the_review_queue(tmp_path, ontology):
    world = make_world(tmp_path / "data", 40, classes=(0, 1, 2), seed=12)
    gold = set(world.manifest.loc[world.manifest["split"] == "gold", "sha256"])
    human = world.human.copy()
    # the biggest gold box (its auto label agrees with the truth); the human calls it something else
    cand = human[human["sha256"].isin(gold)].assign(area=lambda d: (d.x2 - d.x1) * (d.y2 - d.y1))
    row = cand.sort_values("area").index[-1]
    wrong = (int(human.loc[row, "label_id"]) + 1) % 3
    human.loc[row, "label_id"] = wrong
    sha = human.loc[row, "sha256"]
    inputs = q.Inputs(world.manifest, human, world.auto, world.truth, world.data_dir)
    analysis = q.analyse(inputs, P, ontology)
    scores = analysis.label_scores.sort_values("score")
    assert "out of sample" in analysis.counts["label_issue_source"]
    assert scores.iloc[0]["sha256"] == sha and scores.iloc[0]["swap"] < P.label_issue_threshold
    path, n = q.review_queue(
        analysis.label_scores, analysis.boxes, analysis.images, ontology, 0.5, 3, tmp_path / "review"
    )
    tasks = json.loads(path.read_text(encoding="utf-8"))
    assert 1 <= n == len(tasks) <= 3 and tasks[0]["data"]["sha256"] == sha  # worst first
    assert (tmp_path / "review" / "config.xml").is_file()  # Label Studio's labeling interface, Chinese names
    t = tasks[0]
    assert t["data"]["image"].startswith("/data/local-files/?d=raw/")
    worst = scores.iloc[0]
    assert t["meta"]["suspects"][0] == {
        "box": int(worst["box_id"]),
        "origin": "human",
        "label": ontology.zh(wrong),
        "score": round(float(worst["score"]), 4),
        "issue": "class may be wrong",
    }
    r = t["predictions"][0]["result"]
    assert all(x["type"] == "rectanglelabels" and 0 <= x["value"]["x"] <= 100 for x in r)
    assert ontology.zh(wrong) in [x["value"]["rectanglelabels"][0] for x in r]
    # the answers come back through the autolabel stage's importer
    from wanwu.labeling import import_review

    answer = {
        **t,
        "annotations": [{"id": 1, "result": [{**x, "value": {**x["value"], "rectanglelabels": ["猫"]}} for x in r]}],
    }
    export = tmp_path / "export.json"
    export.write_text(json.dumps([answer], ensure_ascii=False), encoding="utf-8")
    back = import_review(export, world.manifest, ontology)
    assert back.images == {sha} and set(back.labels["label_id"]) == {0}


def test_imports_without_autolabel_pass_on_human_labels_alone(tmp_path, ontology):
    """An imported labeled dataset (all seed, no autolabel run, no truth): the gate runs on what there is."""
    world = make_world(
        tmp_path / "data", 40, classes=(0, 1), seed=13, gold_share=0, seed_share=1.0, auto=False, truth=False
    )
    inputs = q.load_inputs(world.data_dir)
    assert inputs.auto is None and inputs.truth is None
    analysis, results = q.check(inputs, P, ontology)
    assert all(r.success for r in results), [r.message() for r in results if not r.success]
    assert analysis.counts["images"]["test"] > 0 and analysis.counts["images"]["val"] > 0  # no gold: 6:2:2
    assert analysis.pr["reference"] is None and analysis.label_scores.empty


def test_prefect_task_and_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("WANWU_PARENT_RUN_ID", raising=False)
    project = _project(tmp_path)
    make_world(project.data_dir, 24, classes=(0, 1, 2), seed=14)
    tq.run(P.model_copy(update={"min_images_per_class": 1}), project, track=True)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["wanwu"], filter_string="tags.`wanwu.stage` = 'quality'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED" and runs.iloc[0]["metrics.passed"] == 1.0
    task = tq.quality_task
    assert task.name == "quality" and task.retries == 1


# ---- the shared real datasets ------------------------------------------------------------------------------------
def _collect(shared: Path, tmp_path: Path, name: str, fmt: str):
    from tasks.collect import run as collect_run
    from wanwu.config import CollectParams, SourceSpec

    project = _project(tmp_path)
    collect_run(CollectParams(sources=[SourceSpec(uri=str(shared / name), format=fmt)], workers=2), project)
    return project


@pytest.mark.shared
def test_shared_raccoon_fails_because_raccoon_is_no_ontology_class(shared_datasets, tmp_path):
    project = _collect(shared_datasets, tmp_path, "raccoon", "voc")
    with pytest.raises(tq.QualityGateFailed) as info:
        tq.run(QualityParams(), project, track=False)
    err = info.value
    # raccoon is no ontology class: every box is 其他 (other), so nothing is left to train on
    assert [f.id for f in err.failures] == ["background_share", "min_classes"]
    assert "observed 0 classes" in str(err) and "class_map" in str(err)
    assert "100.0% (196 of 196 images have no box)" in str(err)
    m = json.loads((project.data_dir / "quality" / "metrics.json").read_text())
    human = contracts.read("labels", project.data_dir / "collect" / "human_labels.parquet")
    assert len(human) > 200 and (human["label_id"] == -1).all() and set(human["source_label"]) == {"raccoon"}
    assert m["counts"]["other_boxes"] == len(human)  # every raccoon box counted as 其他, none trained on


@pytest.mark.shared
def test_shared_coco8_fails_for_too_few_images(shared_datasets, tmp_path):
    project = _collect(shared_datasets, tmp_path, "coco8", "yolo")
    with pytest.raises(tq.QualityGateFailed) as info:
        tq.run(QualityParams(), project, track=False)
    failed = {f.id for f in info.value.failures}
    # 8 images: of the ontology's classes only 狗 (dog) occurs, in one image; everything else is 其他
    assert (
        {"min_images_per_class", "background_share"}
        <= failed
        <= {
            "min_images_per_class",
            "background_share",
            "split_sizes",
        }
    )
    assert "狗 (dog)" in str(info.value) and "(7 of 8 images have no box)" in str(info.value)


def test_great_expectations_makes_no_network_attempt(passed, ontology, tmp_path, monkeypatch):
    """Analytics off (offline.harden) and nothing fetched while validating and building data docs."""
    import socket

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    project, _, _ = passed
    inputs = q.load_inputs(project.data_dir)
    _, results = q.check(inputs, P, ontology, docs_dir=tmp_path / "gx")
    assert all(r.success for r in results) and (tmp_path / "gx" / "index.html").is_file()
    assert attempts == [] and os.environ.get("GX_ANALYTICS_ENABLED") == "false"


def _cat_everywhere_champion(path: Path, ontology) -> Path:
    """An untrained YOLO11n over the ontology whose head says 猫 (cat) with p≈0.95 wherever it looks."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolo11n.yaml")
    cfg["nc"] = len(ontology)
    cfg.pop("yaml_file", None)
    cfg.pop("scale", None)
    cfg_path = path.parent / "yolo11n-champion.yaml"  # the stem tells ultralytics the scale (n)
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    torch.manual_seed(0)
    model = YOLO(str(cfg_path))
    model.model.names = ontology.names_zh
    with torch.no_grad():
        for branch in model.model.model[-1].cv3:  # every scale's classification conv
            branch[-1].weight.zero_()
            branch[-1].bias.fill_(-20.0)
            branch[-1].bias[0] = 3.0
    model.save(path)
    return path


@pytest.mark.slow  # builds and runs a real (untrained) YOLO11n: about 15 s on two cores
def test_a_champion_scores_every_label_against_its_predictions(tmp_path, ontology):
    """quality.champion: its boxes score all labels; one that calls everything 猫 makes the 狗/鸟 labels suspect."""
    world = make_world(tmp_path / "data", 8, classes=(0, 1, 2), seed=15, gold_share=0.5, seed_share=0.5, auto=False)
    weights = _cat_everywhere_champion(tmp_path / "champion.pt", ontology)
    inputs = q.load_inputs(world.data_dir)
    inputs.champion_predictions = q.champion_predictions(weights, world.manifest, world.data_dir, imgsz=64)
    assert len(inputs.champion_predictions) and set(inputs.champion_predictions["label_id"]) == {0}
    analysis = q.analyse(inputs, P, ontology)
    scores = analysis.label_scores
    assert analysis.counts["label_issue_source"] == "champion predictions on every dataset image"
    assert len(scores) == len(analysis.boxes)
    assert scores.loc[scores["label_id"] != 0, "swap"].mean() < scores.loc[scores["label_id"] == 0, "swap"].mean()


def test_boxes_the_proposer_was_unsure_of_become_ignore_regions_not_labels(tmp_path, ontology):
    project = _project(tmp_path)
    make_world(project.data_dir, 40, classes=(0, 1, 2), seed=11)
    strict = P.model_copy(update={"min_proposer_conf": 0.5})
    analysis = q.analyse(q.load_inputs(project.data_dir), strict, ontology, None)
    scored, images = analysis.auto_scored, analysis.images
    weak = scored[scored["reason"] == "low_proposer_conf"]
    assert len(weak) and (weak["proposer_conf"] < 0.5).all()
    assert (scored.loc[scored["passes"], "proposer_conf"] >= 0.5).all()  # nothing weak is a label
    auto_in = analysis.boxes[analysis.boxes["origin"] == "auto"]
    assert len(auto_in) and not auto_in.merge(weak[["sha256", "x1", "y1"]], on=["sha256", "x1", "y1"]).size
    ignore = q.ignore_regions(scored, images, strict.ignore_reasons)
    trainable = set(images.loc[(images["label_origin"] == "auto") & images["split"].isin(["train", "val"]), "sha256"])
    assert set(ignore["sha256"]) <= trainable
    weak_here = weak.loc[weak["sha256"].isin(trainable), ["sha256", "x1", "y1", "x2", "y2"]]
    assert len(weak_here) and len(weak_here.merge(ignore)) == len(weak_here)  # each one is painted over
    assert q.ignore_regions(scored, images, []).empty  # ignore_reasons: [] paints nothing


def test_other_boxes_the_teachers_were_unsure_of_are_painted_not_taught_as_background(tmp_path, ontology):
    """quality.min_other_confidence: an "other" the teachers were unsure of may be an object they could not name;
    it is left out as unsure_other and painted over, while sure "other" boxes stay in the picture as background."""
    project = _project(tmp_path)
    make_world(project.data_dir, 40, classes=(0, 1, 2), seed=11)
    inputs = q.load_inputs(project.data_dir)
    assert not (q.analyse(inputs, P, ontology, None).auto_scored["reason"] == "unsure_other").any()  # 0: off
    strict = P.model_copy(update={"min_other_confidence": 0.8})
    analysis = q.analyse(inputs, strict, ontology, None)
    scored, images = analysis.auto_scored, analysis.images
    other = scored["label_id"] == -1
    unsure = other & (scored["confidence"] < 0.8)
    assert unsure.any() and (other & ~unsure).any()
    assert (scored.loc[unsure, "reason"] == "unsure_other").all()
    assert (scored.loc[other & ~unsure, "reason"] == "other").all()
    assert not scored.loc[other, "passes"].any()  # neither kind is a label
    ignore = q.ignore_regions(scored, images, strict.ignore_reasons)
    trainable = set(images.loc[(images["label_origin"] == "auto") & images["split"].isin(["train", "val"]), "sha256"])
    cols = ["sha256", "x1", "y1", "x2", "y2"]
    unsure_here = scored.loc[unsure & scored["sha256"].isin(trainable), cols]
    sure_here = scored.loc[other & ~unsure & scored["sha256"].isin(trainable), cols]
    assert len(unsure_here) and len(unsure_here.merge(ignore)) == len(unsure_here)  # each one is painted over
    assert len(sure_here) and sure_here.merge(ignore).empty  # the sure ones are not
