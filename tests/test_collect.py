"""The collect stage on a folder of every kind of bad and awkward input a user's photo folder holds.

Each bad kind must end as a reject row with its reason, each awkward kind (CMYK, 16-bit, gray, palette with alpha,
EXIF rotation, animation) as a normal stored RGB image, and the good images beside them must be stored and in the
manifest. A re-run must add nothing, read nothing and leave the tables untouched; an interrupted run must resume
without duplicates or losses.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from tasks import collect
from wanwu import contracts
from wanwu.config import CollectParams, ProjectParams, SourceSpec
from wanwu.images import pixel_sha256

MAX_BYTES = 200_000


# ---- building the inputs ------------------------------------------------------------------------------
def scene(seed: int, w: int = 128, h: int = 96) -> Image.Image:
    """A smooth random picture: distinct per seed (perceptual hashes ~30 bits apart), stable under re-encoding."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height: a decompression bomb to anyone who decodes it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def build_inputs(root: Path) -> dict[str, Path]:
    f: dict[str, Path] = {}
    f["good_jpg"] = save(scene(1), root / "good" / "a.jpg", quality=95)
    f["good_png"] = save(scene(2), root / "good" / "b.png")
    f["good_bmp"] = save(scene(3), root / "good" / "nested" / "deeper" / "c.bmp")
    # the same pixels as a.jpg, in another name and container: one image
    f["dup_png"] = save(Image.open(f["good_jpg"]).convert("RGB"), root / "zz_copies" / "a_again.png")
    # the same scene slightly brighter and smaller: a near-duplicate, kept and reported
    near = ImageEnhance.Brightness(scene(2)).enhance(1.04).resize((120, 90), Image.LANCZOS)
    f["near_jpg"] = save(near, root / "zz_copies" / "b_brighter.jpg", quality=92)

    bad = root / "bad"
    bad.mkdir()
    f["empty"] = bad / "empty.jpg"
    f["empty"].write_bytes(b"")
    whole = io.BytesIO()
    scene(4).save(whole, "JPEG", quality=90)
    f["truncated"] = bad / "truncated.jpg"
    f["truncated"].write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    f["not_image"] = bad / "notes.jpg"
    f["not_image"].write_text("these are my holiday notes, not a photo\n", encoding="utf-8")
    f["bomb_pillow"] = bad / "bomb.png"
    f["bomb_pillow"].write_bytes(png_claiming(100_000, 100_000))
    f["bomb_header"] = bad / "big_header.png"
    f["bomb_header"].write_bytes(png_claiming(8_000, 8_000))  # under Pillow's limit, over max_pixels
    rng = np.random.default_rng(9)
    f["too_large"] = save(Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)), bad / "huge.png")
    f["too_small"] = save(scene(5, 8, 8), bad / "tiny.png")

    odd = root / "odd"
    f["cmyk"] = save(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), odd / "cmyk.jpg", quality=95)
    ramp = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)
    f["sixteen"] = save(Image.fromarray(ramp), odd / "sixteen.png")
    f["gray"] = save(scene(6).convert("L"), odd / "gray.png")
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (32, 0, 64, 48))  # left half index 0 = transparent, right half blue
    f["palette_alpha"] = save(pal, odd / "palette.png", transparency=0)
    rot = Image.new("RGB", (60, 40), (0, 0, 255))
    rot.paste((255, 0, 0), (0, 0, 20, 10))  # a red mark at the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    f["exif6"] = save(rot, odd / "rotated.jpg", exif=exif.tobytes(), quality=95)
    frames = [Image.new("RGB", (48, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    f["animated"] = save(frames[0], odd / "animated.gif", save_all=True, append_images=frames[1:], duration=100)

    arch = root / "archives"
    arch.mkdir()
    good_entry = io.BytesIO()
    scene(7).save(good_entry, "JPEG", quality=95)
    f["zip"] = arch / "bundle.zip"
    with zipfile.ZipFile(f["zip"], "w") as zf:
        zf.writestr("inner/ok.jpg", good_entry.getvalue())
        zf.writestr("../evil.jpg", good_entry.getvalue())
        zf.writestr(zipfile.ZipInfo("/abs.jpg"), good_entry.getvalue())
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = 0o120777 << 16  # a symlink entry
        zf.writestr(link, "/etc/passwd")
    tar_entry = io.BytesIO()
    scene(8).save(tar_entry, "PNG")
    f["tar"] = arch / "bundle.tar.gz"
    with tarfile.open(f["tar"], "w:gz") as tf:
        for name in ("ok_in_tar.png", "../../escape.png"):
            info = tarfile.TarInfo(name)
            info.size = len(tar_entry.getvalue())
            tf.addfile(info, io.BytesIO(tar_entry.getvalue()))
        sym = tarfile.TarInfo("sneaky.png")
        sym.type = tarfile.SYMTYPE
        sym.linkname = "/etc/passwd"
        tf.addfile(sym)
    return f


def params_for(*uris: str, **kw) -> CollectParams:
    kw.setdefault("max_bytes", MAX_BYTES)
    kw.setdefault("workers", 2)
    return CollectParams(sources=[SourceSpec(uri=u) for u in uris], **kw)


@pytest.fixture(scope="module")
def collected(tmp_path_factory, ontology):
    root = tmp_path_factory.mktemp("inputs")
    files = build_inputs(root)
    project = ProjectParams(data_dir=tmp_path_factory.mktemp("data"), ontology=Path("unused.yaml"))
    result = collect.run(params_for(str(root)), project, ontology)
    manifest = contracts.read("manifest", result.manifest)
    rejects = contracts.read("rejects", result.rejects)
    return {
        "root": root,
        "files": files,
        "project": project,
        "result": result,
        "manifest": manifest,
        "rejects": rejects,
    }


def reason_of(c: dict, path: Path | str) -> str:
    rows = c["rejects"][c["rejects"]["source"] == str(path)]
    assert len(rows) == 1, f"{path}: expected one reject row, got {rows.to_dict('records')}"
    return rows.iloc[0]["reason"]


def stored(c: dict, path: Path | str) -> pd.Series:
    rows = c["manifest"][c["manifest"]["source"] == str(path)]
    assert len(rows) == 1, f"{path} is not in the manifest"
    row = rows.iloc[0]
    assert (Path(c["project"].data_dir) / row["path"]).is_file()
    return row


def image_of(c: dict, path: Path | str) -> Image.Image:
    return Image.open(Path(c["project"].data_dir) / stored(c, path)["path"])


# ---- bad input: a reason each, the good beside it survives ---------------------------------------------
@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("empty", "empty"),
        ("truncated", "truncated"),
        ("not_image", "not_image"),
        ("bomb_pillow", "bomb"),
        ("bomb_header", "bomb"),
        ("too_large", "too_large"),
        ("too_small", "too_small"),
        ("dup_png", "duplicate"),
    ],
)
def test_bad_file_is_rejected_with_its_reason(collected, key, reason):
    assert reason_of(collected, collected["files"][key]) == reason


def test_good_images_beside_the_bad_ones_are_stored(collected):
    f = collected["files"]
    for key in ("good_jpg", "good_png", "good_bmp", "near_jpg"):
        row = stored(collected, f[key])
        assert row["path"] == f"raw/{row['sha256'][:2]}/{row['sha256']}.jpg"  # relative to the data folder
        assert Image.open(Path(collected["project"].data_dir) / row["path"]).format == "JPEG"
    assert stored(collected, f["good_png"])["format"] == "PNG"
    assert stored(collected, f["good_bmp"])["format"] == "BMP"


def test_bomb_is_caught_from_the_header_without_decoding(collected):
    r = collected["rejects"].set_index("source")
    assert "from the header" in r.loc[str(collected["files"]["bomb_header"]), "detail"]


def test_exact_duplicate_names_the_kept_image(collected):
    f = collected["files"]
    kept = stored(collected, f["good_jpg"])
    row = collected["rejects"].set_index("source").loc[str(f["dup_png"])]
    assert row["sha256"] == kept["sha256"]
    assert str(f["good_jpg"]) in row["detail"]
    # identity is the pixels: the PNG copy of the JPEG's decoded pixels has the same sha256
    assert pixel_sha256(Image.open(f["dup_png"]).convert("RGB")) == kept["sha256"]


def test_near_duplicate_is_kept_and_reported(collected):
    f = collected["files"]
    near = stored(collected, f["near_jpg"])
    original = stored(collected, f["good_png"])
    table = pd.read_parquet(collected["result"].near_duplicates_table)
    row = table[table["sha256"] == near["sha256"]]
    assert row["near_sha256"].tolist() == [original["sha256"]]
    assert 0 <= int(row["distance"].iloc[0]) <= 4
    assert collected["result"].near_duplicates >= 1


def test_archive_entries_escaping_the_folder_are_rejected(collected):
    f = collected["files"]
    root = collected["root"]
    for entry in ("../evil.jpg", "/abs.jpg", "link.jpg"):
        assert reason_of(collected, f"{f['zip']}!{entry}") == "unsafe_path"
    for entry in ("../../escape.png", "sneaky.png"):
        assert reason_of(collected, f"{f['tar']}!{entry}") == "unsafe_path"
    stored(collected, f"{f['zip']}!inner/ok.jpg")
    stored(collected, f"{f['tar']}!ok_in_tar.png")
    # nothing was unpacked to disk by name, least of all outside the folder
    assert not (root / "evil.jpg").exists() and not (root.parent / "evil.jpg").exists()
    assert not (root.parent / "escape.png").exists() and not Path("/abs.jpg").exists()


def test_counts_add_up(collected):
    r = collected["result"]
    assert (
        r.images_added == len(collected["manifest"]) == r.images_total == 12
    )  # 3 good, 1 near copy, 6 converted, 2 archive entries
    assert sum(r.rejects_by_reason.values()) == len(collected["rejects"])
    assert r.rejects_by_reason["unsafe_path"] == 5
    assert set(collected["manifest"]["split"]) == {"pool"}  # plain images are the unlabeled pool


# ---- awkward input: converted, kept, and checked ------------------------------------------------------
def test_cmyk_is_converted_to_rgb(collected):
    img = image_of(collected, collected["files"]["cmyk"])
    r, g, b = img.getpixel((32, 24))
    assert img.mode == "RGB" and r > 230 and g < 25 and b < 25  # CMYK (0, 255, 255, 0) is red


def test_sixteen_bit_is_scaled_to_eight(collected):
    row = stored(collected, collected["files"]["sixteen"])
    img = image_of(collected, collected["files"]["sixteen"])
    expected = (47 * 64 + 63) * 21 >> 8  # the 16-bit value of the last pixel, top byte
    assert img.mode == "RGB" and abs(img.getpixel((63, 47))[0] - expected) <= 3
    assert row["width"] == 64 and row["height"] == 48


def test_grayscale_becomes_rgb(collected):
    img = image_of(collected, collected["files"]["gray"])
    arr = np.asarray(img).astype(int)
    assert img.mode == "RGB" and np.abs(arr[..., 0] - arr[..., 2]).max() <= 6


def test_palette_with_alpha_is_composited_on_white(collected):
    img = image_of(collected, collected["files"]["palette_alpha"])
    assert min(img.getpixel((8, 24))) > 240  # transparent → white
    r, _, b = img.getpixel((56, 24))
    assert b > 220 and r < 30  # opaque blue stays blue


def test_exif_rotation_is_applied(collected):
    row = stored(collected, collected["files"]["exif6"])
    assert (row["width"], row["height"]) == (40, 60)  # 60×40 stored sideways, shown upright
    img = image_of(collected, collected["files"]["exif6"])
    assert img.getpixel((35, 4))[0] > 200  # the red mark turned with the picture: now top right
    assert img.getpixel((4, 4))[2] > 200


def test_animated_gif_keeps_its_first_frame(collected):
    img = image_of(collected, collected["files"]["animated"])
    assert img.getpixel((24, 24))[0] > 230 and img.getpixel((24, 24))[1] < 30  # frame 0 was red
    assert any(k.startswith("animated") for k in collected["result"].conversions)


# ---- re-run and resume --------------------------------------------------------------------------------
def test_rerun_adds_nothing_and_reads_nothing(collected, monkeypatch, ontology):
    c = collected
    tables = sorted(Path(c["result"].manifest).parent.glob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in tables}

    def no_decode(*a, **k):
        raise AssertionError("a re-run decoded a file it had already seen")

    monkeypatch.setattr(collect.images, "decode", no_decode)
    again = collect.run(params_for(str(c["root"])), c["project"], ontology)
    assert again.images_added == 0 and sum(again.rejects_by_reason.values()) == 0
    assert again.images_skipped > 0 and again.images_total == c["result"].images_total
    assert {p: p.stat().st_mtime_ns for p in tables} == before  # nothing rewritten: DVC sees no change


def test_new_file_after_a_run_is_the_only_one_read(tmp_path, ontology):
    src = tmp_path / "in"
    save(scene(11), src / "one.jpg")
    project = ProjectParams(data_dir=tmp_path / "data")
    first = collect.run(params_for(str(src)), project, ontology)
    save(scene(12), src / "two.jpg")
    second = collect.run(params_for(str(src)), project, ontology)
    assert (first.images_added, second.images_added, second.images_skipped) == (1, 1, 1)
    assert len(contracts.read("manifest", second.manifest)) == 2


def test_tables_deleted_by_hand_are_rebuilt(tmp_path, ontology):
    src = tmp_path / "in"
    save(scene(13), src / "one.jpg")
    project = ProjectParams(data_dir=tmp_path / "data")
    collect.run(params_for(str(src)), project, ontology)
    (project.data_dir / "collect" / "manifest.parquet").unlink()  # the skip index alone must not hide the image
    again = collect.run(params_for(str(src)), project, ontology)
    assert again.images_total == 1 and again.images_reindexed == 1


def test_interrupted_run_resumes_without_duplicates_or_losses(tmp_path, monkeypatch, ontology):
    src = tmp_path / "in"
    for i in range(8):
        save(scene(20 + i), src / f"{i}.jpg")
    save(Image.open(src / "0.jpg").convert("RGB"), src / "copy_of_0.png")  # a real duplicate: reported once
    project = ProjectParams(data_dir=tmp_path / "data")
    monkeypatch.setattr(collect, "CHECKPOINT_EVERY", 2)
    real_store = collect.images.store
    calls = {"n": 0}

    def dying_store(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # killed hard mid-run: no final table write, only the last checkpoint survives
            monkeypatch.setattr(collect._Tables, "write", lambda self: None)
            raise KeyboardInterrupt
        return real_store(*a, **k)

    monkeypatch.setattr(collect.images, "store", dying_store)
    real_write = collect._Tables.write
    with pytest.raises(KeyboardInterrupt):
        collect.run(params_for(str(src), workers=1), project, ontology)
    partial = contracts.read("manifest", project.data_dir / "collect" / "manifest.parquet")
    assert 0 < len(partial) < 8
    # images written to raw/ whose rows never reached the manifest: a resume must re-index, not duplicate
    assert len(list((project.data_dir / "raw").rglob("*.jpg"))) > len(partial)
    monkeypatch.setattr(collect.images, "store", real_store)
    monkeypatch.setattr(collect._Tables, "write", real_write)
    resumed = collect.run(params_for(str(src), workers=1), project, ontology)
    assert resumed.images_reindexed >= 1
    manifest = contracts.read("manifest", resumed.manifest)
    rejects = contracts.read("rejects", resumed.rejects)
    assert len(manifest) == 8 and manifest["sha256"].is_unique
    assert sorted(manifest["source"]) == sorted(str(src / f"{i}.jpg") for i in range(8))
    assert rejects["reason"].tolist() == ["duplicate"]
    assert len(list((project.data_dir / "raw").rglob("*.jpg"))) == 8
    assert not list((project.data_dir / "raw").rglob("*.tmp"))


# ---- the sample world ---------------------------------------------------------------------------------
SAMPLE = "sample://?n=16&seed=3&size=96&catalogue_train=1&catalogue_val=1&generic_train=2&generic_val=1"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, ontology):
    project = ProjectParams(data_dir=tmp_path_factory.mktemp("sample"))
    result = collect.run(params_for(SAMPLE), project, ontology)
    return project, result


def test_sample_world_scenes_are_stored_with_their_roles_and_truth(sampled, ontology):
    from wanwu import sample_world as sw

    project, result = sampled
    spec = sw.WorldSpec.from_uri(SAMPLE)
    manifest = contracts.read("manifest", result.manifest)
    truth = contracts.read("labels", result.truth)
    human = contracts.read("labels", result.human_labels)
    assert result.images_added == 16 and len(manifest) == 16
    scenes = {s.uri: s for s in (sw.render_scene(spec, i, ontology) for i in range(spec.n))}
    by_source = manifest.set_index("source")
    for uri, scene in scenes.items():
        assert by_source.loc[uri, "split"] == scene.role
    assert len(truth) == sum(len(s.boxes) for s in scenes.values()) == result.truth_boxes
    assert set(truth["origin"]) == {"truth"} and set(truth["proposer"]) == {"truth"}
    labeled = [s for s in scenes.values() if s.role in ("seed", "gold")]
    expected_human = sum(1 for s in labeled for b in s.boxes if b.label_id >= 0)
    assert len(human) == expected_human == result.boxes_imported
    assert (human["label_id"] >= 0).all() and set(human["origin"]) == {"human"}
    assert set(human["sha256"]) <= set(manifest.loc[manifest["split"].isin(["seed", "gold"]), "sha256"])
    # the truth boxes sit on the stored image's pixels
    sha_of = dict(zip(manifest["source"], manifest["sha256"], strict=True))
    first = next(iter(scenes.values()))
    rows = truth[truth["sha256"] == sha_of[first.uri]].sort_values("box_id")
    assert np.allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(), [[b.x1, b.y1, b.x2, b.y2] for b in first.boxes])
    assert (project.data_dir / "world" / "catalogue").is_dir()
    assert (project.data_dir / "world" / "generic" / "data.yaml").is_file()


def test_sample_rerun_renders_nothing(sampled, monkeypatch, ontology):
    from wanwu import sample_world as sw

    project, _ = sampled

    def no_render(*a, **k):
        raise AssertionError("a re-run rendered a scene it had already stored")

    monkeypatch.setattr(sw, "render_scene", no_render)
    monkeypatch.setattr(sw, "write_catalogue", no_render)
    again = collect.run(params_for(SAMPLE), project, ontology)
    assert again.images_added == 0 and again.images_skipped == 16 and again.images_total == 16


def test_stage_summary_names_outputs_and_reasons(collected, capsys):
    collect.print_summary(collected["result"])
    out = capsys.readouterr().out
    assert "manifest.parquet" in out and "unsafe_path 5" in out and "bomb 2" in out


def test_not_an_image_stays_not_image_after_ultralytics_patched_pillow(tmp_path):
    """ultralytics replaces PIL.Image.open process-wide; in the pipeline process collect must still say not_image."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is text, not a picture")
    code = (
        "import ultralytics, sys; from wanwu import images\n"
        "try:\n"
        f"    images.decode(open(r'{bad}','rb').read(), max_pixels=10**8, min_side=8)\n"
        "except images.ImageReject as e:\n"
        "    print(e.reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "not_image"
