"""The sample world: deterministic, honest truth, the side corpora in the layouts ultralytics reads."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from wanwu import sample_world as sw
from wanwu.sample_world import SampleWorldError, WorldSpec

ROOT = Path(__file__).resolve().parents[1]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "data.yaml"  # data.yaml holds the absolute path, which differs by design
    }


@pytest.fixture(scope="module")
def scenes200(ontology):
    spec = WorldSpec(n=200, seed=0)
    return spec, list(sw.iter_scenes(spec, ontology))


# ---- cheap import, sprites -------------------------------------------------------------------------------
def test_import_renders_nothing():
    code = (
        "import sys, wanwu.sample_world as sw; "
        "assert 'PIL.ImageFont' not in sys.modules, 'font machinery imported at import time'; "
        "assert sw.font_path.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_class_has_1_to_3_sprites_over_4_domains(ontology):
    cps = sw.sprite_codepoints(ontology)
    assert sorted(cps) == list(range(16))
    assert all(1 <= len(v) <= 3 for v in cps.values())
    assert {ontology[cid].domain for cid in cps} == {"动物", "植物", "商品", "地标"}
    assert cps[ontology.lookup("cat")][:2] == ["1F408", "1F431"]


def test_generic_pool_is_large_and_holds_no_ontology_class(ontology):
    pool = sw.generic_codepoints()
    class_cps = {cp for v in sw.sprite_codepoints(ontology).values() for cp in v}
    assert len(pool) >= 60 and len(set(pool)) == len(pool)
    assert not class_cps & set(pool)
    assert sw.generic_codepoints(ontology) == pool  # with this ontology every generic object is a distractor
    assert all(ontology.lookup_or_other(name) == -1 for _, name in sw.GENERIC_SPRITES)


def test_every_codepoint_renders_in_colour(ontology):
    class_cps = [cp for v in sw.sprite_codepoints(ontology).values() for cp in v]
    colourful = set()
    for cp in class_cps + sw.generic_codepoints():
        a = np.asarray(sw.glyph(cp, 40))
        assert a.shape[2] == 4 and (a[..., 3] > 128).sum() > 50, f"{cp} renders (almost) empty"
        rgb = a[..., :3].astype(int)[a[..., 3] > 200]
        if (rgb.max(axis=1) - rgb.min(axis=1) > 60).mean() > 0.05:
            colourful.add(cp)
    # colour, not black outlines only (some sprites are grey by design: a keyboard, a ghost, a black cat)
    assert {"1F408", "1F33B", "1F339", "1F335", "1F5FD", "1F4D5", "1F392"} <= colourful
    assert len(colourful) > 0.7 * (len(class_cps) + len(sw.generic_codepoints()))
    # a ZWJ sequence is its own glyph, not the base glyph drawn again
    assert _png(sw.glyph("1F408-200D-2B1B", 40)) != _png(sw.glyph("1F408", 40))


def test_a_renamed_or_extended_ontology_gets_its_sprites(tmp_path):
    from wanwu.ontology import Ontology

    path = tmp_path / "ontology.yaml"
    path.write_text(
        "classes:\n"
        "  - {id: 0, zh: 猫, en: kitty, domain: 动物, synonyms: [cat]}\n"
        "  - {id: 1, zh: 马, en: horse, domain: 动物}\n"
        "  - {id: 2, zh: 独角兽, en: unicorn, domain: 动物}\n",
        encoding="utf-8",
    )
    onto = Ontology.load(path)
    cps = sw.sprite_codepoints(onto)
    assert cps[0] == list(sw.CLASS_SPRITES["cat"]) and cps[1] == ["1F40E"] and 2 not in cps
    assert "1F40E" not in sw.generic_codepoints(onto)  # a horse is a class here, so never a distractor


# ---- scenes ----------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_png_bytes_and_a_new_seed_differs(ontology):
    spec = WorldSpec(n=50, seed=7)
    first = [_png(sw.render_scene(spec, i, ontology).image) for i in (0, 3, 49)]
    again = [_png(sw.render_scene(spec, i, ontology).image) for i in (0, 3, 49)]
    other = [_png(sw.render_scene(WorldSpec(n=50, seed=8), i, ontology).image) for i in (0, 3, 49)]
    assert first == again
    assert all(a != b for a, b in zip(first, other, strict=True))
    # a scene depends on (seed, index) only: not on n, nor on what was rendered before, nor on the process
    assert _png(sw.render_scene(WorldSpec(n=600, seed=7), 3, ontology).image) == first[1]
    code = (
        "import hashlib, io, sys; from wanwu import sample_world as sw; from wanwu.ontology import Ontology; "
        "s = sw.render_scene(sw.WorldSpec(n=50, seed=7), 49, Ontology.load('ontology.yaml')); "
        "b = io.BytesIO(); s.image.save(b, format='PNG'); print(hashlib.sha256(b.getvalue()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == hashlib.sha256(first[2]).hexdigest()


def test_roles_are_about_10_20_70_and_fixed_per_index(scenes200):
    _, scenes = scenes200
    roles = Counter(s.role for s in scenes)
    assert set(roles) == {"seed", "gold", "pool"}
    assert 15 <= roles["seed"] <= 25 and 32 <= roles["gold"] <= 48 and 127 <= roles["pool"] <= 153
    assert [sw.scene_role(WorldSpec(n=1000, seed=0), i) for i in range(200)] == [s.role for s in scenes]
    small = Counter(sw.scene_role(WorldSpec(n=10), i) for i in range(10))
    assert small["seed"] >= 1 and small["gold"] >= 1  # even a tiny world has labeled seed and a test set


def test_scene_records(scenes200, ontology):
    spec, scenes = scenes200
    s = scenes[17]
    assert s.index == 17 and s.uri == "sample://?n=200&seed=0#17"
    assert s.image.mode == "RGB" and s.image.size == (256, 256)
    assert sw.parse_scene_uri(s.uri) == (spec, 17)


def test_every_class_appears_and_boxes_are_honest(scenes200, ontology):
    spec, scenes = scenes200
    seen = Counter()
    sides = []
    per_scene = []
    for s in scenes:
        classes = [b for b in s.boxes if b.label_id >= 0]
        per_scene.append(len(classes))
        for b in s.boxes:
            assert 0 <= b.x1 < b.x2 <= spec.size and 0 <= b.y1 < b.y2 <= spec.size, (s.uri, b)
            assert b.name == (ontology.en(b.label_id) if b.label_id >= 0 else "distractor")
            seen[b.label_id] += 1
            sides.append(max(b.x2 - b.x1, b.y2 - b.y1) / spec.size)
    assert set(range(16)) <= set(seen), f"classes never seen: {set(range(16)) - set(seen)}"
    assert seen[-1] > 100  # distractors are there, labeled -1
    assert max(per_scene) >= 7 and np.mean(per_scene) > 3  # cluttered
    assert min(sides) < 0.07 and max(sides) > 0.4  # from small to large


def test_hidden_objects_get_no_truth():
    """An object painted over by another one of the same shape is not visible: it gets no box."""
    rng = np.random.default_rng(0)
    canvas = np.zeros((64, 64, 3), np.float32)
    owner = np.full((64, 64), -1, np.int16)
    sprite = sw._sprite(rng, "1F34E", 30)
    below = sw._Placed(sprite, 10, 10, 0, "cat")
    above = sw._Placed(sprite, 12, 10, -1, "distractor")
    beside = sw._Placed(sprite, 40, 40, 1, "dog")  # cut by the border: boxed where it can be seen
    truth = sw._composite(canvas, owner, [below, above, beside])
    assert [b.name for b in truth] == ["distractor", "dog"]
    assert truth[1].x2 == 64 and truth[1].y2 == 64


# ---- the spec and its URI --------------------------------------------------------------------------------
def test_from_uri_parses_every_field_and_round_trips():
    spec = WorldSpec.from_uri("sample://?n=100&seed=3&size=128&gold_frac=0.25&max_distractors=0")
    assert (spec.n, spec.seed, spec.size, spec.gold_frac, spec.max_distractors) == (100, 3, 128, 0.25, 0)
    assert WorldSpec.from_uri(spec.uri) == spec
    assert WorldSpec.from_uri("sample://") == WorldSpec()
    assert WorldSpec().uri == "sample://?n=600&seed=0"
    assert WorldSpec.from_uri("sample://?n=600&seed=0#17") == WorldSpec()
    with pytest.raises(pydantic_error()):
        WorldSpec().n = 3  # frozen


def pydantic_error():
    from pydantic import ValidationError

    return ValidationError


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("sample://?n=10&colour=red", ["unknown key 'colour'", "seed_frac"]),
        ("sample://?n=abc", ["n='abc'", "integer"]),
        ("sample://?n=0", ["n='0'", "greater than or equal to 1"]),
        ("sample://?size=1.5", ["size='1.5'"]),
        ("sample://?n=5&n=6", ["given twice"]),
        ("sample://?seed_frac=0.6&gold_frac=0.6", ["exceeds 1"]),
        ("sample://?min_objects=5&max_objects=2", ["larger than max_objects"]),
        ("file:///tmp/x?n=3", ["not a sample-world URI"]),
        ("sample://host?n=3", ["not a sample-world URI"]),
    ],
)
def test_from_uri_errors_name_the_key_and_value(uri, words):
    with pytest.raises(SampleWorldError) as e:
        WorldSpec.from_uri(uri)
    for w in words:
        assert w in str(e.value)


def test_scene_uri_index_is_checked():
    with pytest.raises(SampleWorldError, match="0..9"):
        sw.parse_scene_uri("sample://?n=10#10")
    assert sw.parse_scene_uri("sample://?n=10") == (WorldSpec(n=10), None)


# ---- side corpora ----------------------------------------------------------------------------------------
def test_catalogue_is_an_ultralytics_classification_folder_per_domain(tmp_path, ontology):
    from ultralytics.data.utils import check_cls_dataset

    spec = WorldSpec(seed=1, catalogue_train=2, catalogue_val=1, catalogue_size=48)
    out = sw.write_catalogue(spec, ontology, tmp_path / "a")
    assert out == tmp_path / "a"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(["动物", "植物", "商品", "地标"])
    assert "CC BY-SA 4.0" in (out / "OPENMOJI_LICENSE.md").read_text(encoding="utf-8")
    for domain, ids in ontology.by_domain().items():
        folders = sorted(n.replace(" ", "_") for n in (ontology.en(i) for i in ids))
        for split, count in (("train", 2), ("val", 1)):
            assert sorted(p.name for p in (out / domain / split).iterdir()) == folders
            for f in folders:
                assert sorted(p.name for p in (out / domain / split / f).iterdir()) == [
                    f"{i}.png" for i in range(count)
                ]
        info = check_cls_dataset(out / domain)
        assert info["nc"] == len(ids) and sorted(info["names"].values()) == folders
    from PIL import Image

    img = Image.open(out / "地标" / "train" / "statue_of_liberty" / "0.png")
    assert img.mode == "RGB" and img.size == (48, 48)

    again = sw.write_catalogue(spec, ontology, tmp_path / "b")
    assert _tree_digest(out) == _tree_digest(again)
    other = sw.write_catalogue(
        WorldSpec(seed=2, catalogue_train=2, catalogue_val=1, catalogue_size=48), ontology, tmp_path / "c"
    )
    assert _tree_digest(out) != _tree_digest(other)

    # idempotent: a rerun keeps what exists and fills what is missing
    victim = out / "动物" / "val" / "cat" / "0.png"
    before = victim.stat().st_mtime_ns
    (out / "植物" / "train" / "rose" / "1.png").unlink()
    sw.write_catalogue(spec, ontology, out)
    assert victim.stat().st_mtime_ns == before
    assert _tree_digest(out) == _tree_digest(again)


def test_generic_corpus_is_yolo_layout_with_unnamed_objects_only(tmp_path, ontology, monkeypatch):
    drawn: list[str] = []
    real_sprite = sw._sprite

    def spy(rng, cp, target):
        drawn.append(cp)
        return real_sprite(rng, cp, target)

    monkeypatch.setattr(sw, "_sprite", spy)
    spec = WorldSpec(seed=0, size=128, generic_train=6, generic_val=3)
    data_yaml = sw.write_generic(spec, tmp_path / "g")
    out = tmp_path / "g"
    assert data_yaml == out / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    assert data["names"] == {0: "object"} and Path(data["path"]).is_absolute() and Path(data["path"]) == out.resolve()
    assert (out / data["train"]).is_dir() and (out / data["val"]).is_dir()
    for split, count in (("train", 6), ("val", 3)):
        images = sorted(p.stem for p in (out / "images" / split).glob("*.png"))
        labels = sorted(p.stem for p in (out / "labels" / split).glob("*.txt"))
        assert images == labels == [f"{i:06d}" for i in range(count)]
    rows = [line.split() for p in (out / "labels").rglob("*.txt") for line in p.read_text().splitlines()]
    assert len(rows) >= 9
    for row in rows:
        assert row[0] == "0" and len(row) == 5
        cx, cy, w, h = map(float, row[1:])
        assert 0 < w <= 1 and 0 < h <= 1
        assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6 and cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6

    class_cps = {cp for v in sw.sprite_codepoints(ontology).values() for cp in v}
    assert drawn and not class_cps & set(drawn), "an ontology class was drawn into the generic corpus"

    again = sw.write_generic(spec, tmp_path / "h").parent
    assert _tree_digest(out) == _tree_digest(again)
    n_drawn = len(drawn)
    sw.write_generic(spec, out)  # idempotent: nothing to redo
    assert len(drawn) == n_drawn
