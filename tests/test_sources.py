"""Source readers: URL lists against a real HTTP server on loopback, and the YOLO / VOC / COCO / class-folder importers
on small datasets built here, with the mistakes real datasets have (missing images, degenerate boxes, unknown
class ids, annotations pointing at no image, EXIF-rotated photos)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks import collect
from wanwu import contracts
from wanwu.config import CollectParams, ProjectParams, SourceSpec
from wanwu.sources import ClassMapper, SourceError, detect_format, fetch, unsafe_entry_name


def scene(seed: int, w: int = 128, h: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def run(tmp_path: Path, ontology, *specs: SourceSpec, **kw) -> collect.CollectResult:
    kw.setdefault("workers", 2)
    project = ProjectParams(data_dir=tmp_path / "data")
    return collect.run(CollectParams(sources=list(specs), **kw), project, ontology)


def tables(result: collect.CollectResult) -> dict:
    return {
        "manifest": contracts.read("manifest", result.manifest),
        "rejects": contracts.read("rejects", result.rejects),
        "human": contracts.read("labels", result.human_labels),
        "image_labels": contracts.read("image_labels", result.image_labels),
    }


# ---- URL lists ----------------------------------------------------------------------------------------
BIG = 300_000
CALLS: Counter = Counter()


IMAGES = {"/a.jpg": jpeg(scene(1)), "/b.jpg": jpeg(scene(2))}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, code: int, body: bytes, length: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "image/jpeg")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        CALLS[self.path] += 1
        if self.path in IMAGES:
            self._send(200, IMAGES[self.path])
        elif self.path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, IMAGES["/a.jpg"])
        elif self.path == "/big.jpg":
            self._send(200, b"\xff" * BIG)
        elif self.path == "/big_unannounced.jpg":  # no Content-Length: the stream itself must be cut
            self.send_response(200)
            self.end_headers()
            for _ in range(BIG // 10_000):
                self.wfile.write(b"\xff" * 10_000)
            self.close_connection = True
        elif self.path == "/flaky.jpg":  # fails once, then works: a retry must get it
            if CALLS[self.path] == 1:
                self._send(503, b"busy")
            else:
                self._send(200, jpeg(scene(3)))
        else:
            self._send(404, b"not here")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-body is exactly what the size-limit tests make them do


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_list_downloads_good_images_and_rejects_the_rest_with_reasons(server, tmp_path, ontology):
    urls = tmp_path / "urls.txt"
    names = ["a.jpg", "b.jpg", "flaky.jpg", "missing.jpg", "slow.jpg", "big.jpg", "big_unannounced.jpg"]
    urls.write_text(
        "# photos from the team's server\n\n"
        + "\n".join(f"{server}/{n}" for n in names)
        + "\nftp://example.invalid/x.jpg\n",
        encoding="utf-8",
    )
    result = run(tmp_path, ontology, SourceSpec(uri=str(urls)), url_timeout=0.5, url_retries=1, max_bytes=BIG // 2)
    t = tables(result)
    assert sorted(t["manifest"]["source"]) == sorted(f"{server}/{n}" for n in ("a.jpg", "b.jpg", "flaky.jpg"))
    assert set(t["manifest"]["split"]) == {"pool"}
    r = t["rejects"].set_index("source")
    assert r.loc[f"{server}/missing.jpg", "reason"] == "download_failed"
    assert "404" in r.loc[f"{server}/missing.jpg", "detail"]
    assert r.loc[f"{server}/slow.jpg", "reason"] == "download_failed"
    assert "timeout" in r.loc[f"{server}/slow.jpg", "detail"]
    assert r.loc[f"{server}/big.jpg", "reason"] == "too_large"
    assert r.loc[f"{server}/big_unannounced.jpg", "reason"] == "too_large"
    assert r.loc["ftp://example.invalid/x.jpg", "reason"] == "download_failed"
    assert CALLS["/flaky.jpg"] == 2 and CALLS["/missing.jpg"] == 1  # 5xx retried, 404 not

    # a re-run skips what was stored and tries the failed downloads again, without duplicating their rows
    before = CALLS["/a.jpg"]
    again = run(tmp_path, ontology, SourceSpec(uri=str(urls)), url_timeout=0.5, url_retries=0, max_bytes=BIG // 2)
    assert again.images_added == 0 and CALLS["/a.jpg"] == before and CALLS["/missing.jpg"] == 2
    rejects = contracts.read("rejects", again.rejects)
    assert rejects["source"].is_unique


def test_fetch_gives_up_after_the_retries(server):
    from wanwu.images import ImageReject

    with pytest.raises(ImageReject, match="timeout") as e:
        fetch(f"{server}/slow.jpg", timeout=0.3, retries=1, max_bytes=10**6, backoff=0.01)
    assert "2 attempts" in e.value.detail


# ---- YOLO ---------------------------------------------------------------------------------------------
def make_yolo(root: Path) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"path": "/nowhere", "names": {0: "cat", 1: "puppy", 2: "zebra"}}))
    scene(1).save(root / "images" / "train" / "one.jpg", quality=95)
    (root / "labels" / "train" / "one.txt").write_text(
        "0 0.5 0.5 0.5 0.5\n"  # cat: 64×48 box in the middle
        "1 0.9 0.5 0.4 0.2\n"  # puppy → 狗, sticks out on the right: clipped
        "2 0.25 0.25 0.1 0.1\n"  # zebra: not in the ontology → other (-1), kept
        "0 1.5 0.5 0.2 0.2\n"  # entirely outside the image: bad_box
        "7 0.5 0.5 0.1 0.1\n"  # class id not in data.yaml: bad_annotation
    )
    scene(2).save(root / "images" / "train" / "background.jpg", quality=95)  # no label file: no objects
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.4 0.4 0.1 0.1\n")
    # a phone photo stored sideways (EXIF 6): YOLO labels are fractions of the upright image
    upright_w, upright_h = 60, 90
    raw = Image.new("RGB", (upright_h, upright_w), (0, 0, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(root / "images" / "train" / "phone.jpg", exif=exif.tobytes(), quality=95)
    (root / "labels" / "train" / "phone.txt").write_text("0 0.5 0.25 0.5 0.5\n")
    return root


def test_yolo_dataset_is_imported_as_seed_with_human_boxes(tmp_path, ontology):
    root = make_yolo(tmp_path / "yolo")
    assert detect_format(str(root)) == "yolo"
    result = run(tmp_path, ontology, SourceSpec(uri=str(root)))
    t = tables(result)
    m = t["manifest"].set_index("source")
    one = m.loc[str(root / "images" / "train" / "one.jpg")]
    assert set(t["manifest"]["split"]) == {"seed"}
    boxes = t["human"][t["human"]["sha256"] == one["sha256"]].sort_values("box_id")
    assert boxes["source_label"].tolist() == ["cat", "puppy", "zebra"]
    assert boxes["label_id"].tolist() == [ontology.lookup("猫"), ontology.lookup("狗"), -1]
    assert np.allclose(boxes.iloc[0][["x1", "y1", "x2", "y2"]].astype(float), [32, 24, 96, 72])
    assert float(boxes.iloc[1]["x2"]) == 128.0  # clipped to the image
    assert (boxes["origin"] == "human").all() and (boxes["proposer"] == "human").all()
    assert boxes["topk_ids"].map(list).tolist() == [[i] for i in boxes["label_id"]]
    assert not boxes["needs_review"].any() and (boxes["confidence"] == 1.0).all()
    r = t["rejects"]
    assert r.loc[r["source"].str.endswith("one.txt:4"), "reason"].tolist() == ["bad_box"]
    assert r.loc[r["source"].str.endswith("one.txt:5"), "reason"].tolist() == ["bad_annotation"]
    assert r.loc[r["source"].str.endswith("orphan.txt"), "reason"].tolist() == ["missing_file"]
    # the background image is labeled (no objects): seed, no boxes
    assert m.loc[str(root / "images" / "train" / "background.jpg"), "split"] == "seed"
    # the sideways photo: stored upright, its box on the upright pixels
    phone = m.loc[str(root / "images" / "train" / "phone.jpg")]
    assert (phone["width"], phone["height"]) == (60, 90)
    pb = t["human"][t["human"]["sha256"] == phone["sha256"]].iloc[0]
    assert np.allclose([pb.x1, pb.y1, pb.x2, pb.y2], [15, 0, 45, 45])
    # every box the files hold is accounted for
    assert result.boxes_read == 3 + 2 + 2 + 1
    assert result.boxes_imported + result.boxes_rejected + result.boxes_on_duplicates == result.boxes_read


def test_class_map_renames_and_checks_its_targets(tmp_path, ontology):
    root = make_yolo(tmp_path / "yolo")
    result = run(tmp_path, ontology, SourceSpec(uri=str(root), class_map={"zebra": "鸟", "cat": "other"}))
    human = tables(result)["human"]
    assert human.loc[human["source_label"] == "zebra", "label_id"].tolist() == [ontology.lookup("bird")]
    assert set(human.loc[human["source_label"] == "cat", "label_id"]) == {-1}
    with pytest.raises(SourceError, match="zebr"):
        ClassMapper({"zebra": "zebr"}, ontology)


# ---- Pascal VOC ---------------------------------------------------------------------------------------
VOC = """<annotation><filename>{fn}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = (
    "<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
)


def test_voc_dataset_boxes_follow_the_exif_rotation(tmp_path, ontology):
    root = tmp_path / "voc"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    scene(4).save(root / "images" / "dog.jpg", quality=95)
    (root / "annotations" / "dog.xml").write_text(
        VOC.format(
            fn="dog.jpg",
            w=128,
            h=96,
            objects=OBJ.format(n="dog", a=10, b=20, c=50, d=60) + OBJ.format(n="dog", a=30, b=30, c=30, d=40),
        )
    )  # zero width: bad_box
    # a sideways photo annotated on its raw 90×60 pixels (the XML size says so): boxes turn with the image
    raw = Image.new("RGB", (90, 60), (0, 120, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(root / "images" / "side.jpg", exif=exif.tobytes(), quality=95)
    (root / "annotations" / "side.xml").write_text(
        VOC.format(fn="side.jpg", w=90, h=60, objects=OBJ.format(n="cactus", a=0, b=0, c=30, d=10))
    )
    (root / "annotations" / "gone.xml").write_text(
        VOC.format(fn="gone.jpg", w=10, h=10, objects=OBJ.format(n="dog", a=1, b=1, c=5, d=5))
    )
    (root / "annotations" / "broken.xml").write_text("<annotation><object>")
    assert detect_format(str(root)) == "voc"
    result = run(tmp_path, ontology, SourceSpec(uri=str(root)))
    t = tables(result)
    m = t["manifest"].set_index("source")
    side = m.loc[str(root / "images" / "side.jpg")]
    assert (side["width"], side["height"]) == (60, 90)
    b = t["human"][t["human"]["sha256"] == side["sha256"]].iloc[0]
    assert np.allclose([b.x1, b.y1, b.x2, b.y2], [50, 0, 60, 30])  # (0,0,30,10) rotated 90° clockwise
    assert b.label_id == ontology.lookup("cactus")
    r = t["rejects"].set_index("source")
    assert r.loc[str(root / "annotations" / "gone.xml"), "reason"] == "missing_file"
    assert "gone.jpg" in r.loc[str(root / "annotations" / "gone.xml"), "detail"]
    assert r.loc[str(root / "annotations" / "broken.xml"), "reason"] == "bad_annotation"
    assert r.loc[f"{root / 'annotations' / 'dog.xml'}#object1", "reason"] == "bad_box"
    assert result.boxes_imported == 2


# ---- COCO ---------------------------------------------------------------------------------------------
def test_coco_json_with_an_annotation_for_no_image(tmp_path, ontology):
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    scene(5).save(root / "images" / "a.jpg", quality=95)
    scene(6).save(root / "images" / "b.jpg", quality=95)
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 128, "height": 96},
            {"id": 2, "file_name": "b.jpg", "width": 128, "height": 96},
            {"id": 3, "file_name": "lost.jpg", "width": 10, "height": 10},
        ],
        "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 17, "bbox": [10, 10, 40, 30], "iscrowd": 0},
            {"id": 101, "image_id": 1, "category_id": 18, "bbox": [60, 20, 30, 30], "iscrowd": 0},
            {"id": 102, "image_id": 2, "category_id": 18, "bbox": [0, 0, 128, 96], "iscrowd": 1},
            {"id": 103, "image_id": 42, "category_id": 17, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 104, "image_id": 3, "category_id": 17, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        ],
    }
    (root / "instances.json").write_text(json.dumps(data))
    assert detect_format(str(root)) == "coco"
    result = run(tmp_path, ontology, SourceSpec(uri=str(root / "instances.json")))
    t = tables(result)
    assert len(t["manifest"]) == 2 and set(t["manifest"]["split"]) == {"seed"}
    h = t["human"].sort_values("box_id")
    assert h["label_id"].tolist() == [ontology.lookup("cat"), ontology.lookup("dog")]
    assert np.allclose(h.iloc[0][["x1", "y1", "x2", "y2"]].astype(float), [10, 10, 50, 40])
    r = t["rejects"].set_index("source")
    bad = r.loc[f"{root / 'instances.json'}#annotation103"]
    assert bad["reason"] == "bad_annotation" and "image_id 42" in bad["detail"] and "instances.json" in bad["detail"]
    assert r.loc[f"{root / 'instances.json'}#annotation102", "reason"] == "crowd"
    assert r.loc[f"{root / 'instances.json'}#image3", "reason"] == "missing_file"
    assert result.boxes_read == 5 and result.boxes_imported == 2 and result.boxes_rejected == 3


# ---- class folders, format detection, safety checks ---------------------------------------------------
def test_class_folders_become_image_labels(tmp_path, ontology):
    root = tmp_path / "pets"
    for i, (split, cls) in enumerate([("train", "cats"), ("train", "dog"), ("val", "dog"), ("val", "ants")]):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        scene(30 + i).save(root / split / cls / f"{i}.jpg", quality=95)
    result = run(tmp_path, ontology, SourceSpec(uri=str(root), format="folders", class_map={"cats": "cat"}))
    t = tables(result)
    il = t["image_labels"].sort_values("source_label")
    assert il["source_label"].tolist() == ["ants", "cats", "dog", "dog"]
    assert il["label_id"].tolist() == [-1, ontology.lookup("cat"), ontology.lookup("dog"), ontology.lookup("dog")]
    assert set(il["origin"]) == {"human"} and set(t["manifest"]["split"]) == {"seed"}


def test_gold_role_and_pool_images_labeled_later(tmp_path, ontology):
    """A picture first collected unlabeled, then found in a labeled set: its labels arrive, its split rises."""
    pool = tmp_path / "pool"
    pool.mkdir()
    scene(1).save(pool / "x.png")
    root = tmp_path / "gold"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: [cat]\n")
    scene(1).save(root / "images" / "x.png")
    (root / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    result = run(tmp_path, ontology, SourceSpec(uri=str(pool)), SourceSpec(uri=str(root), role="gold"))
    t = tables(result)
    assert len(t["manifest"]) == 1 and t["manifest"]["split"].tolist() == ["gold"]
    assert len(t["human"]) == 1 and result.boxes_on_duplicates == 0
    assert t["rejects"]["reason"].tolist() == ["duplicate"]


@pytest.mark.parametrize(
    ("name", "unsafe"),
    [
        ("a/b.jpg", False),
        ("../x.jpg", True),
        ("a/../../x.jpg", True),
        ("/etc/x.jpg", True),
        ("C:/x.jpg", True),
        ("..\\x.jpg", True),
        ("a..b.jpg", False),
    ],
)
def test_unsafe_entry_names(name, unsafe):
    assert (unsafe_entry_name(name) is not None) == unsafe


def test_missing_source_is_a_clear_error(tmp_path, ontology):
    with pytest.raises(SourceError, match="no such file or folder"):
        run(tmp_path, ontology, SourceSpec(uri=str(tmp_path / "nope")))


def test_relative_sources_resolve_against_the_project_root(tmp_path):
    from wanwu.config import load_params

    (tmp_path / "params.yaml").write_text("collect:\n  sources: [photos, 'sample://?n=2&seed=0']\n")
    p = load_params(tmp_path / "params.yaml")
    assert [s.uri for s in p.collect.sources] == [str(tmp_path / "photos"), "sample://?n=2&seed=0"]


def test_glob_and_archive_sources(tmp_path, ontology):
    import zipfile

    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    scene(40).save(photos / "2024" / "a.png")
    scene(41).save(photos / "b.png")
    scene(42).save(photos / "skip.jpg")  # not matched by the glob
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.writestr("in/c.jpg", jpeg(scene(43)))
        zf.writestr("readme.txt", "not a picture")
    assert detect_format(str(bundle)) == "archive"
    result = run(tmp_path, ontology, SourceSpec(uri=str(photos / "**" / "*.png")), SourceSpec(uri=str(bundle)))
    sources = sorted(tables(result)["manifest"]["source"])
    assert sources == sorted([str(photos / "2024" / "a.png"), str(photos / "b.png"), f"{bundle}!in/c.jpg"])
    assert result.files_ignored == 1


def test_a_class_map_typo_fails_before_any_work(tmp_path, ontology):
    root = make_yolo(tmp_path / "yolo")
    with pytest.raises(SourceError, match=r"collect.sources\[1\].*'zebra' → 'zebr'"):
        run(tmp_path, ontology, SourceSpec(uri=str(root)), SourceSpec(uri=str(root), class_map={"zebra": "zebr"}))
    assert not (tmp_path / "data" / "collect" / "manifest.parquet").exists()
