"""One test per quality expectation: a small dataset that breaks it, and the message the user then reads.

The base world (30 scenes, 3 classes, human seed/gold labels, auto labels on pool and gold, truth) passes every
expectation; each test breaks one thing in a copy of its tables and runs the real gate (great-expectations 1.x,
ephemeral context). The assertions are on the text of :class:`QualityGateFailed`: the expectation's id, the
observed value, the threshold with its params key, and an example that names the offending image or box.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _quality_world import make_world

from wanwu import quality as q
from wanwu.config import QualityParams

P = QualityParams(min_images_per_class=2, max_class_imbalance=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("qworld") / "data", 30, classes=(0, 1, 2), seed=3)


def _inputs(world, **tables) -> q.Inputs:
    t = {
        "manifest": world.manifest.copy(),
        "human": world.human.copy(),
        "auto": world.auto.copy(),
        "truth": world.truth.copy(),
    }
    t.update(tables)
    return q.Inputs(t["manifest"], t["human"], t["auto"], t["truth"], world.data_dir)


def _fail(
    inputs: q.Inputs, ontology, params: QualityParams = P, reference: dict | None = None, only=None
) -> q.QualityGateFailed:
    _, results = q.check(inputs, params, ontology, reference, only=only)
    with pytest.raises(q.QualityGateFailed) as info:
        q.gate(results)
    return info.value


def _msg(err: q.QualityGateFailed, check: str) -> str:
    ids = [f.id for f in err.failures]
    assert check in ids, f"{check} did not fail; failures: {ids}\n{err}"
    line = next(ln for ln in str(err).splitlines() if f"[{check}]" in ln)
    print(f"\n{check}: {line.strip()}")  # the table in the report is built from these lines (pytest -s)
    return line


def _gate(check: str, inputs: q.Inputs, ontology, params: QualityParams = P, reference: dict | None = None) -> str:
    """Run the real gate on the suite of the table ``check`` lives in; return the user's line for ``check``."""
    table = {s.id: s.table for s in q.specs(params, ontology)}[check]
    return _msg(_fail(inputs, ontology, params, reference, only=[table]), check)


def _one(df: pd.DataFrame, mask=None) -> int:
    """The index of the first row (matching ``mask``)."""
    return int(df.index[mask][0] if mask is not None else df.index[0])


def _train_seed(world) -> str:
    """A seed image the hash puts in train (u < 0.75 with a gold set present)."""
    seeds = world.manifest[world.manifest["split"] == "seed"]["sha256"]
    return next(s for s in seeds if q.hash_unit(s) < 0.7 and (world.human["sha256"] == s).any())


def test_base_world_passes_every_expectation(world, ontology):
    _, results = q.check(_inputs(world), P, ontology)
    assert [r.id for r in results if not r.success] == []
    assert len(results) == len(q.specs(P, ontology)) == 25


# ---- manifest ------------------------------------------------------------------------------------------------
def test_manifest_sha_unique(world, ontology):
    man = pd.concat([world.manifest, world.manifest.iloc[[5]]], ignore_index=True)
    line = _gate("manifest_sha_unique", _inputs(world, manifest=man), ontology)
    assert "2 of 31 images" in line and world.manifest["sha256"].iloc[5][:12] in line


def test_image_file_exists(world, ontology):
    man = world.manifest.copy()
    man.loc[7, "path"] = "raw/00/gone.jpg"
    line = _gate("image_file_exists", _inputs(world, manifest=man), ontology)
    assert "1 of 30 images" in line and "raw/00/gone.jpg" in line and "re-run `wanwu stage collect`" in line


def _extra_image(world, sha: str, width: int, height: int) -> pd.DataFrame:
    row = world.manifest.iloc[[-1]].copy()
    row["sha256"], row["width"], row["height"], row["phash"] = sha, width, height, None
    return pd.concat([world.manifest, row], ignore_index=True)


def test_image_min_side(world, ontology):
    man = _extra_image(world, "a" * 64, 20, 20)
    line = _gate("image_min_side", _inputs(world, manifest=man), ontology)
    assert "min short_side = 20" in line and "quality.min_image_side = 32" in line and "aaaaaaaaaaaa" in line


def test_image_max_side(world, ontology):
    man = _extra_image(world, "b" * 64, 10000, 64)
    line = _gate("image_max_side", _inputs(world, manifest=man), ontology)
    assert "max long_side = 10000" in line and "quality.max_image_side = 8192" in line


def test_manifest_split_known(world, ontology):
    man = world.manifest.copy()
    man.loc[_one(man, man["split"] == "pool"), "split"] = "train"
    line = _gate("manifest_split_known", _inputs(world, manifest=man), ontology)
    assert "split=train" in line and "gold, seed or pool" in line


# ---- labels -------------------------------------------------------------------------------------------------------
def test_label_image_known(world, ontology):
    auto = world.auto.copy()
    auto.loc[0, "sha256"] = "0" * 64
    line = _gate("label_image_known", _inputs(world, auto=auto), ontology)
    assert "000000000000#" in line and "1 of" in line


def test_box_positive_width(world, ontology):
    auto = world.auto.copy()
    x1, x2 = auto.loc[0, "x1"], auto.loc[0, "x2"]
    auto.loc[0, "x1"], auto.loc[0, "x2"] = x2, x1
    line = _gate("box_positive_width", _inputs(world, auto=auto), ontology)
    assert "x2 > x1" in line and f"{auto.loc[0, 'sha256'][:12]}#" in line


def test_box_positive_height(world, ontology):
    human = world.human.copy()
    y1, y2 = human.loc[0, "y1"], human.loc[0, "y2"]
    human.loc[0, "y1"], human.loc[0, "y2"] = y2, y1
    line = _gate("box_positive_height", _inputs(world, human=human), ontology)
    assert "y2 > y1" in line and "human" in line


def test_box_min_side(world, ontology):
    human = world.human.copy()
    human.loc[1, "x2"] = human.loc[1, "x1"] + 0.5
    line = _gate("box_min_side", _inputs(world, human=human), ontology)
    assert "min short_side = 0.5" in line and "quality.min_box_side = 1.0" in line


def test_box_inside_image(world, ontology):
    human = world.human.copy()
    human.loc[2, "x2"] = 96 + 10.0
    line = _gate("box_inside_image", _inputs(world, human=human), ontology)
    assert "max outside_px = 10" in line and "quality.box_tolerance_px = 1.0" in line


def test_label_in_ontology(world, ontology):
    auto = world.auto.copy()
    auto.loc[3, "label_id"] = 99
    line = _gate("label_in_ontology", _inputs(world, auto=auto), ontology)
    assert "label_id=99" in line and "ontology ids 0..15 or −1 (other)" in line


def test_confidence_range(world, ontology):
    auto = world.auto.copy()
    auto.loc[4, "confidence"] = 1.3
    line = _gate("confidence_range", _inputs(world, auto=auto), ontology)
    assert "max confidence = 1.3" in line and "0 ≤ confidence ≤ 1" in line


def test_proposer_conf_range(world, ontology):
    auto = world.auto.copy()
    auto.loc[5, "proposer_conf"] = -0.2
    line = _gate("proposer_conf_range", _inputs(world, auto=auto), ontology)
    assert "proposer_conf=-0.2" in line


def test_topk_sum(world, ontology):
    auto = world.auto.copy()
    auto.at[6, "topk_ids"] = [0, 1]
    auto.at[6, "topk_probs"] = [0.8, 0.5]
    line = _gate("topk_sum", _inputs(world, auto=auto), ontology)
    assert "max topk_sum = 1.3" in line and "quality.topk_sum_tolerance = 1.001" in line


def test_topk_lengths(world, ontology):
    auto = world.auto.copy()
    auto.at[7, "topk_ids"] = [0, 1, 2]
    auto.at[7, "topk_probs"] = [0.9]
    line = _gate("topk_lengths", _inputs(world, auto=auto), ontology)
    assert "topk_n_ids=3, topk_n_probs=1" in line


def test_topk_prob_range(world, ontology):
    auto = world.auto.copy()
    auto.at[8, "topk_ids"] = [0, 1]
    auto.at[8, "topk_probs"] = [-0.1, 0.5]
    line = _gate("topk_prob_range", _inputs(world, auto=auto), ontology)
    assert "prob=-0.1" in line and "top-1" in line


def test_topk_ids_in_ontology(world, ontology):
    auto = world.auto.copy()
    auto.at[9, "topk_ids"] = [42, 0]
    auto.at[9, "topk_probs"] = [0.6, 0.3]
    line = _gate("topk_ids_in_ontology", _inputs(world, auto=auto), ontology)
    assert "class_id=42" in line


# ---- dataset images and classes ----------------------------------------------------------------------------------
def test_background_share(world, ontology):
    # the proposer found nothing on the pool images: they would enter the dataset as "nothing here"
    gold = set(world.manifest.loc[world.manifest["split"] == "gold", "sha256"])
    auto = world.auto[world.auto["sha256"].isin(gold)]
    # by default such images stay out of the dataset (unsure is not "background"); kept, the gate catches them
    analysis, _ = q.check(_inputs(world, auto=auto), P, ontology)
    assert analysis.counts["auto_images_without_box"] > 0
    kept = P.model_copy(update={"keep_auto_background": True})
    line = _gate("background_share", _inputs(world, auto=auto), ontology, params=kept)
    assert "images have no box" in line and "auto-labeled" in line and "quality.max_background_share = 0.3" in line


def test_boxes_per_image(world, ontology):
    sha = _train_seed(world)
    grid = [
        {
            **world.human.iloc[0].to_dict(),
            "sha256": sha,
            "box_id": 100 + k,
            "x1": x,
            "y1": y,
            "x2": x + 8.0,
            "y2": y + 8.0,
        }
        for k, (x, y) in enumerate((9.0 * i, 8.0 * j) for i in range(10) for j in range(11))
    ]
    human = pd.concat([world.human, pd.DataFrame(grid)], ignore_index=True)
    line = _gate("boxes_per_image", _inputs(world, human=human), ontology)
    assert "max n_boxes = 1" in line and "quality.max_boxes_per_image = 100" in line and sha[:12] in line


def test_min_classes(world, ontology):
    # every label maps to no class, as when a dataset's classes are not in the ontology (raccoon)
    human, auto = world.human.copy(), world.auto.copy()
    for t in (human, auto):
        t["label_id"] = -1
        t["topk_ids"] = [[-1]] * len(t)
        t["topk_probs"] = [[1.0]] * len(t)
    line = _gate("min_classes", _inputs(world, human=human, auto=auto), ontology)
    assert "observed 0 classes" in line and "quality.min_classes = 1" in line and "class_map" in line


def test_min_images_per_class(world, ontology):
    human = world.human.copy()
    human.loc[_one(human, human["sha256"] == _train_seed(world)), "label_id"] = 7  # one image of 树 (tree)
    line = _gate("min_images_per_class", _inputs(world, human=human), ontology)
    assert "树 (tree)" in line and "images_train=" in line and "quality.min_images_per_class = 2" in line


def test_class_balance(world, ontology):
    # one box of 书 (book), in a train image, against ~20 of the most frequent class
    human = world.human.copy()
    seeds = [s for s in world.manifest.loc[world.manifest["split"] == "seed", "sha256"] if q.hash_unit(s) < 0.7]
    rows = [_one(human, human["sha256"] == s) for s in seeds if (human["sha256"] == s).any()][:1]
    human.loc[rows, "label_id"] = 9
    line = _gate(
        "class_balance", _inputs(world, human=human), ontology, P.model_copy(update={"min_images_per_class": 1})
    )
    assert "书 (book)" in line and "quality.max_class_imbalance = 10" in line


def test_split_sizes(world, ontology):
    # gold images plus a single training image: no validation split
    keep = set(world.manifest.loc[world.manifest["split"] == "gold", "sha256"]) | {_train_seed(world)}
    man = world.manifest[world.manifest["sha256"].isin(keep)]
    human = world.human[world.human["sha256"].isin(keep)]
    auto = world.auto[world.auto["sha256"].isin(keep)]
    line = _gate("split_sizes", _inputs(world, manifest=man, human=human, auto=auto), ontology)
    assert "val: 0 images, needs 1" in line and "quality.min_split_images = train: 1, val: 1, test: 0" in line


def test_no_split_leakage(world, ontology):
    """The stage itself never produces leakage (near-duplicates share a split, copies of gold images are left out),
    so the breaking dataset here is a split assignment from elsewhere: a near-duplicate pair in train and test."""
    analysis = q.analyse(_inputs(world), P, ontology)
    images = analysis.images.copy()
    a = _one(images, images["split"] == "train")
    b = _one(images, images["split"] == "test")
    images.loc[a, "phash"] = images.loc[b, "phash"][:-1] + ("0" if images.loc[b, "phash"][-1] != "0" else "1")
    tables = q.build_tables(_inputs(world), images, analysis.boxes, [], ontology, P)
    with pytest.raises(q.QualityGateFailed) as info:
        q.gate(q.validate(tables, P, ontology))
    line = _msg(info.value, "no_split_leakage")
    assert "(min distance = " in line and "(train) ~" in line and "quality.near_dup_distance = 4" in line


def test_near_duplicates_never_leak_through_the_stage(world, ontology):
    """The same picture re-encoded as a pool image beside its gold original: left out, reported, no leakage."""
    man = world.manifest.copy()
    gold = man[man["split"] == "gold"].iloc[0]
    pool_row = _one(man, man["split"] == "pool")
    man.loc[pool_row, "phash"] = gold["phash"]
    analysis, results = q.check(_inputs(world, manifest=man), P, ontology)
    assert all(r.success for r in results if r.id == "no_split_leakage")
    assert man.loc[pool_row, "sha256"] not in set(analysis.images["sha256"])
    assert analysis.counts["images_left_out"].get("near_duplicate_of_gold") == 1


def test_drift_psi(world, ontology, tmp_path):
    bright = make_world(tmp_path / "bright", 30, classes=(0, 1, 2), seed=4, brightness=(200, 235))
    reference = q.analyse(_inputs(bright), P, ontology).reference
    line = _gate("drift_psi", _inputs(world), ontology, reference=reference)
    assert "brightness: psi=" in line and "quality.drift_max_psi = 0.25" in line


def test_every_expectation_has_a_breaking_test(ontology):
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert {s.id for s in q.specs(P, ontology)} <= tested


def test_gate_message_lists_every_failure_with_threshold_and_fix(world, ontology):
    auto = world.auto.copy()
    auto.loc[4, "confidence"] = 1.3
    auto.at[6, "topk_probs"] = [0.8, 0.5, 0.1]
    err = _fail(_inputs(world, auto=auto), ontology)
    text = str(err)
    assert text.startswith("quality gate failed: 2 of 25 expectations not met")
    assert text.count("Fix: ") == 2 and "threshold" in text
    assert "nothing downstream trains on these labels" in text
    f = err.failures[0]
    assert f.observed and f.threshold and f.fix and not f.success
