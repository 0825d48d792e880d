"""Fusion strategies: what a user relies on when several teachers disagree or only know their own domain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wanwu.models import fusion as fz

K = 4  # classes 0..3, column 4 = other


def onto_probs(rows: list[dict[int, float]]) -> np.ndarray:
    out = np.zeros((len(rows), K + 1), np.float32)
    for i, r in enumerate(rows):
        for col, p in r.items():
            out[i, col] = p
    return out


# an "animal" expert knows classes 0, 1 and other; a "plant" expert knows 2, 3 and other
COV_A = np.array([1, 1, 0, 0, 1], bool)
COV_B = np.array([0, 0, 1, 1, 1], bool)


def test_domain_experts_do_not_drown_a_class_in_other():
    # a cat crop: the animal expert is sure, the plant expert says "not mine"
    a = onto_probs([{0: 0.9, 4: 0.1}, {4: 0.95, 1: 0.05}])
    b = onto_probs([{4: 0.9, 2: 0.1}, {4: 0.9, 3: 0.1}])
    for fused in (fz.vote([a, b], [COV_A, COV_B]), fz.weighted([a, b], [COV_A, COV_B], [1.0, 1.0])):
        assert fused.argmax(1).tolist() == [0, 4]  # cat stays cat; a distractor everybody rejects stays other
        np.testing.assert_allclose(fused.sum(1), 1.0, atol=1e-5)
    # without the coverage normalisation a plain average would have said "other" for the cat
    assert ((a + b) / 2).argmax(1)[0] == 4


def test_weighted_is_the_plain_weighted_average_when_every_teacher_covers_everything():
    rng = np.random.default_rng(0)
    p1, p2 = (rng.dirichlet(np.ones(K + 1), size=6).astype(np.float32) for _ in range(2))
    full = np.ones(K + 1, bool)
    fused = fz.weighted([p1, p2], [full, full], [3.0, 1.0])
    np.testing.assert_allclose(fused, (3 * p1 + p2) / 4, atol=1e-6)


def test_product_lets_only_the_experts_that_know_a_class_weigh_it_against_other():
    # a cat crop the animal expert is 60 % sure of; the plant expert, rightly, says "not mine" (0.99)
    a = onto_probs([{0: 0.6, 4: 0.4}, {4: 0.95, 1: 0.05}])
    b = onto_probs([{4: 0.99, 2: 0.01}, {4: 0.9, 3: 0.1}])
    cov = [COV_A, COV_B]
    fused = fz.product([a, b], cov, [1.0, 1.0])
    assert fused.argmax(1).tolist() == [0, 4]  # cat; the distractor both reject stays other
    np.testing.assert_allclose(fused.sum(1), 1.0, atol=1e-5)
    # cat vs other is the animal expert's own odds: the plant expert's "not mine" counts on both sides
    assert fused[0, 0] / fused[0, 4] == pytest.approx(0.6 / 0.4, rel=1e-4)
    # the weighted mean puts the plant expert's "not mine" on "other" alone: the cat becomes other
    assert fz.weighted([a, b], cov, [1.0, 1.0]).argmax(1)[0] == 4


def test_product_is_the_weighted_geometric_mean_when_every_teacher_covers_everything():
    rng = np.random.default_rng(2)
    p1, p2 = (rng.dirichlet(np.ones(K + 1), size=6).astype(np.float32) for _ in range(2))
    full = np.ones(K + 1, bool)
    geo = p1.astype(np.float64) ** 2 * p2
    np.testing.assert_allclose(
        fz.Fusion("product", [full, full], [2.0, 1.0]).raw([p1, p2]), geo / geo.sum(1, keepdims=True), atol=1e-5
    )
    # a teacher that cannot say "other" has no opinion on the columns it does not know: a class it knows only
    # wins through its own probabilities, not through the silence on the others
    no_other = np.array([1, 1, 0, 0, 0], bool)
    t = onto_probs([{0: 0.5, 1: 0.5}])
    plant = onto_probs([{2: 0.9, 4: 0.1}])
    assert fz.product([t, plant], [no_other, COV_B], [1.0, 1.0]).argmax(1)[0] == 2


def test_rejection_reads_an_experts_own_classes_other_domains_and_distractors_apart():
    # the animal expert (classes 0, 1): a cat named right, a dog named other, a rose named cat, a distractor rejected
    a = onto_probs([{0: 0.9, 4: 0.1}, {4: 0.7, 1: 0.3}, {0: 0.6, 4: 0.4}, {4: 0.8, 0: 0.2}])
    r = fz.rejection(a, COV_A, np.array([0, 1, 2, 4]))
    assert r == {
        "own_objects": 2,
        "own_right": 0.5,
        "own_other": 0.5,
        "foreign_rejected": 0.0,
        "distractors_rejected": 1.0,
    }


def test_vote_majority_and_abstention():
    t1 = onto_probs([{1: 0.6, 4: 0.4}])
    t2 = onto_probs([{1: 0.8, 4: 0.2}])
    t3 = onto_probs([{2: 0.7, 4: 0.3}])
    fused = fz.vote([t1, t2, t3], [np.ones(K + 1, bool)] * 3)
    assert fused.argmax(1)[0] == 1  # two votes beat one
    # all abstain (vote other) → the mean distribution, which says other
    o = onto_probs([{4: 0.8, 0: 0.2}])
    assert fz.vote([o, o], [COV_A, COV_B]).argmax(1)[0] == 4


def test_stacked_learns_which_teacher_to_trust_and_round_trips_as_json(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, K + 1, n)
    good = np.full((n, K + 1), 0.05, np.float32)
    good[np.arange(n), y] = 0.8
    noisy = rng.dirichlet(np.ones(K + 1), size=n).astype(np.float32)  # knows nothing
    meta = fz.StackedModel.fit([noisy, good], y)
    fused = fz.Fusion("stacked", [np.ones(K + 1, bool)] * 2, meta=meta)([noisy, good])
    assert fz.accuracy(fused, y) > 0.95
    np.testing.assert_allclose(fused.sum(1), 1.0, atol=1e-5)
    path = meta.save(tmp_path / "meta.json")
    json.loads(path.read_text())  # plain JSON, no pickle
    again = fz.StackedModel.load(path)
    np.testing.assert_allclose(again.predict_proba([noisy, good]), meta.predict_proba([noisy, good]), atol=1e-6)


def test_stacked_with_two_classes_and_unseen_columns():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 100) * 4  # only classes 0 and other seen
    p = np.full((100, K + 1), 0.1, np.float32)
    p[np.arange(100), y] = 0.6
    meta = fz.StackedModel.fit([p], y)
    out = meta.predict_proba([p])
    assert out.shape == (100, K + 1)
    assert np.all(out[:, 1:4] == 0)  # never seen, never predicted
    assert fz.accuracy(out, y) == 1.0


def test_fit_weights_rewards_accurate_teachers_on_what_they_cover():
    y = np.array([0, 1, 2, 3, 4, 4])
    perfect = np.eye(K + 1, dtype=np.float32)[y]
    wrong = np.eye(K + 1, dtype=np.float32)[(y + 1) % (K + 1)]
    w = fz.fit_weights([perfect, wrong], [np.ones(K + 1, bool)] * 2, y)
    assert w[0] == 1.0 and w[1] == pytest.approx(0.05)


def test_fusion_version_and_errors():
    cov = [np.ones(K + 1, bool)] * 2
    v1 = fz.Fusion("weighted", cov, [1.0, 1.0]).version()
    assert v1 == fz.Fusion("weighted", cov, [1.0, 1.0]).version()
    assert v1 != fz.Fusion("weighted", cov, [1.0, 2.0]).version()
    with pytest.raises(fz.FusionError, match="choose one of"):
        fz.Fusion("median", cov)
    with pytest.raises(fz.FusionError, match="meta-model"):
        fz.Fusion("stacked", cov)
    with pytest.raises(fz.FusionError, match="2 teachers"):
        fz.Fusion("vote", cov)([np.zeros((1, K + 1))])
    assert fz.columns_to_ids(fz.ids_to_columns([0, 3, -1], K), K).tolist() == [0, 3, -1]


def test_calibration_sharpens_an_underconfident_fusion_without_moving_any_top_class():
    # a fusion that is right 90 % of the time but says ~0.45: what a weighted mean over domain experts looks like
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, K + 1, n)
    right = rng.random(n) < 0.9
    top = np.where(right, y, (y + 1 + rng.integers(0, K, n)) % (K + 1))
    probs = np.full((n, K + 1), 0.55 / K, np.float32)
    probs[np.arange(n), top] = 0.45
    t = fz.fit_temperature(probs, y)
    assert t < 0.5  # sharpen
    cal = fz.temper(probs, t)
    assert (cal.argmax(1) == probs.argmax(1)).all()
    np.testing.assert_allclose(cal.sum(1), 1.0, atol=1e-5)
    before, after = fz.calibration_error(probs, y), fz.calibration_error(cal, y)
    assert before > 0.4 and after < 0.05
    assert cal.max(1).mean() == pytest.approx(0.9, abs=0.05)  # the confidence now says how often it is right
    # an overconfident one (always 0.99, right half the time) is flattened instead
    over = np.full((n, K + 1), 0.01 / K, np.float32)
    half = np.where(rng.random(n) < 0.5, y, (y + 1) % (K + 1))
    over[np.arange(n), half] = 0.99
    assert fz.fit_temperature(over, y) > 1.5


def test_the_temperature_is_part_of_the_fusion_and_its_version():
    cov = [np.ones(K + 1, bool)] * 2
    a = onto_probs([{0: 0.5, 1: 0.3, 4: 0.2}])
    plain, sharp = fz.Fusion("weighted", cov, [1.0, 1.0]), fz.Fusion("weighted", cov, [1.0, 1.0], temperature=0.5)
    assert plain([a, a])[0, 0] == pytest.approx(0.5, abs=1e-6)
    assert sharp([a, a])[0, 0] > 0.6 and sharp.raw([a, a])[0, 0] == pytest.approx(0.5, abs=1e-6)
    assert plain.version() != sharp.version()
    with pytest.raises(fz.FusionError, match="temperature"):
        fz.Fusion("weighted", cov, temperature=0.0)
