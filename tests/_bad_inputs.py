"""The bad-input corpus (issue 9): each case writes one broken input into a folder and returns what the user is
told, through the same entry point a run uses (params loader, ontology loader, the collect stage, the trainer's
start-model check, the proposer).

Used by tests/test_bad_inputs.py; run as a script it prints the Markdown table in docs/bad_inputs.md:

    .venv/bin/python tests/_bad_inputs.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Told:
    """What the user gets: an exception that stops the run, or a row in collect's rejects.parquet."""

    file: Path  # the file at fault: the message must name it
    message: str  # the exception text, or ``source: detail`` of the reject row
    kind: str  # exception class name, or "rejects.parquet (reason)"
    stopped: bool  # True: the run stops; False: the run goes on and records the row


@dataclass
class Case:
    name: str  # the input, as the docs table shows it
    fix: str  # a phrase of the fix the message must contain
    make: Callable[[Path], Told]


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)


def _raised(fn: Callable[[], object], file: Path) -> Told:
    try:
        fn()
    except Exception as e:  # the corpus reports whatever the real code raises
        return Told(file, str(e), type(e).__name__, True)
    raise AssertionError(f"{file}: accepted, but it should have been refused")


def _ontology():
    from wanwu.ontology import Ontology

    return Ontology.load(ROOT / "ontology.yaml")


def _collect(d: Path, uri: Path) -> object:
    from tasks import collect
    from wanwu.config import CollectParams, ProjectParams, SourceSpec

    params = CollectParams(sources=[SourceSpec(uri=str(uri))], workers=1)
    return collect.run(params, ProjectParams(data_dir=d / "data"), _ontology())


def _rejected(d: Path, uri: Path, file: Path, reason: str) -> Told:
    """Run collect on ``uri`` and return the reject row whose source is ``file`` (or starts with it)."""
    from wanwu import contracts

    result = _collect(d, uri)
    rows = contracts.read("rejects", result.rejects)
    rows = rows[rows["source"].str.startswith(str(file)) & (rows["reason"] == reason)]
    if rows.empty:
        raise AssertionError(f"{file}: no {reason} row in rejects.parquet")
    row = rows.iloc[0]
    return Told(file, f"{row['source']}: {row['detail']}", f"rejects.parquet ({reason})", False)


# ---- params.yaml and ontology.yaml --------------------------------------------------------------------------
def _params_file(text: str) -> Callable[[Path], Told]:
    """A case: ``params.yaml`` holding ``text``, loaded the way every entry point loads it."""

    def case(d: Path) -> Told:
        from wanwu.config import load_params

        f = d / "params.yaml"
        f.write_text(text)
        return _raised(lambda: load_params(f), f)

    return case


params_not_yaml = _params_file("collect:\n  sources: [sample://?n=4\n  workers: 2\n")
params_misspelt_key = _params_file("train:\n  epoch: 5\n")
params_wrong_value = _params_file("collect:\n  jpeg_quality: 300\n")


def ontology_duplicate_names(d: Path) -> Told:
    from wanwu.ontology import Ontology

    f = d / "ontology.yaml"
    f.write_text(
        "classes:\n"
        "  - {id: 0, zh: 猫, en: cat, domain: 动物, synonyms: [kitty]}\n"
        "  - {id: 1, zh: 狗, en: dog, domain: 动物, synonyms: [Kitty]}\n",
        encoding="utf-8",
    )
    return _raised(lambda: Ontology.load(f), f)


# ---- labeled datasets ---------------------------------------------------------------------------------------
def _yolo(d: Path) -> Path:
    root = d / "yolo"
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [cat, dog]\n")
    _image(root / "images" / "train" / "a.jpg")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    return root


def yolo_label_without_image(d: Path) -> Told:
    root = _yolo(d)
    orphan = root / "labels" / "train" / "b.txt"
    orphan.write_text("1 0.5 0.5 0.2 0.2\n")
    return _rejected(d, root, orphan, "missing_file")


def yolo_no_label_matches(d: Path) -> Told:
    root = d / "yolo"
    _image(root / "images" / "train" / "a.jpg")
    (root / "labels" / "training").mkdir(parents=True)  # the folders do not mirror images/
    (root / "labels" / "training" / "a.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (root / "data.yaml").write_text("names: [cat]\n")
    return _raised(lambda: _collect(d, root), root / "labels")


def yolo_class_id_not_in_names(d: Path) -> Told:
    root = _yolo(d)
    label = root / "labels" / "train" / "a.txt"
    label.write_text("0 0.5 0.5 0.4 0.4\n5 0.3 0.3 0.1 0.1\n")
    return _rejected(d, root, label, "bad_annotation")


def voc_xml_without_image(d: Path) -> Told:
    root = d / "voc"
    _image(root / "images" / "a.jpg")
    xml = root / "annotations" / "b.xml"
    xml.parent.mkdir(parents=True)
    xml.write_text(
        "<annotation><filename>b.jpg</filename><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    return _rejected(d, root, xml, "missing_file")


def _coco(d: Path, **changes: object) -> Path:
    root = d / "coco"
    _image(root / "images" / "a.jpg", 1)
    _image(root / "images" / "b.jpg", 2)
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20]},
        ],
    }
    data.update(changes)
    js = root / "instances.json"
    js.write_text(json.dumps(data))
    return js


def coco_image_id_mismatch(d: Path) -> Told:
    js = _coco(d)
    data = json.loads(js.read_text())
    data["annotations"].append({"id": 12, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]})
    js.write_text(json.dumps(data))
    return _rejected(d, js, Path(f"{js}#annotation12"), "bad_annotation")


def coco_category_id_mismatch(d: Path) -> Told:
    js = _coco(d)
    data = json.loads(js.read_text())
    data["annotations"].append({"id": 12, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]})
    js.write_text(json.dumps(data))
    return _rejected(d, js, Path(f"{js}#annotation12"), "bad_annotation")


def coco_no_image_id_matches(d: Path) -> Told:
    js = _coco(
        d,
        annotations=[
            {"id": 10, "image_id": 101, "category_id": 1, "bbox": [5, 5, 20, 20]},
            {"id": 11, "image_id": 102, "category_id": 2, "bbox": [5, 5, 20, 20]},
        ],
    )
    return _raised(lambda: _collect(d, js), js)


def coco_no_category_matches(d: Path) -> Told:
    js = _coco(d, categories=[{"id": 91, "name": "cat"}, {"id": 92, "name": "dog"}])
    return _raised(lambda: _collect(d, js), js)


def coco_file_name_missing(d: Path) -> Told:
    js = _coco(d, images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"}])
    return _rejected(d, js, Path(f"{js}#image2"), "missing_file")


def coco_not_json(d: Path) -> Told:
    js = _coco(d)
    js.write_text(js.read_text()[:40])  # cut short
    return _rejected(d, js.parent, js, "bad_annotation")


# ---- model files --------------------------------------------------------------------------------------------
def _fit(model: Path) -> object:
    from wanwu.training import fit

    return fit(model.parent / "data.yaml", model.parent / "out", model=model, model_param="train.model")


def pt_text_file(d: Path) -> Told:
    f = d / "best.pt"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\n")  # a Git LFS pointer
    return _raised(lambda: _fit(f), f)


def pt_empty(d: Path) -> Told:
    f = d / "best.pt"
    f.write_bytes(b"")
    return _raised(lambda: _fit(f), f)


def pt_truncated(d: Path) -> Told:
    import torch

    f = d / "best.pt"
    torch.save({"model": None}, f)
    f.write_bytes(f.read_bytes()[:200])
    return _raised(lambda: _fit(f), f)


def pt_state_dict(d: Path) -> Told:
    import torch

    f = d / "best.pt"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), f)
    return _raised(lambda: _fit(f), f)


def proposer_tensor(d: Path) -> Told:
    import torch

    from wanwu.models.proposer import Proposer

    f = d / "proposer.pt"
    torch.save(torch.zeros(4, 4), f)
    return _raised(lambda: Proposer(f, _ontology()), f)


CASES = [
    Case("params.yaml: not valid YAML (unclosed `[`)", "Fix the syntax", params_not_yaml),
    Case("params.yaml: misspelt key (`train.epoch`)", "Remove it or check", params_misspelt_key),
    Case("params.yaml: value out of range (`jpeg_quality: 300`)", "fix each key below", params_wrong_value),
    Case("ontology.yaml: one synonym in two classes", "keep it in one class", ontology_duplicate_names),
    Case("YOLO: a label file whose image is missing", "put the image there", yolo_label_without_image),
    Case("YOLO: labels/ does not mirror images/ (no label matches)", "mirror the images/", yolo_no_label_matches),
    Case("YOLO: class id not in data.yaml `names`", "add id 5 to `names`", yolo_class_id_not_in_names),
    Case("VOC: XML naming an image that is not there", "correct <filename>", voc_xml_without_image),
    Case("COCO: an annotation's image_id not in `images`", "correct the annotation's image_id", coco_image_id_mismatch),
    Case("COCO: an annotation's category_id not in `categories`", "correct the category_id", coco_category_id_mismatch),
    Case("COCO: no annotation's image_id is in `images`", "exported together", coco_no_image_id_matches),
    Case("COCO: no category_id is in `categories`", "add the `categories` list", coco_no_category_matches),
    Case("COCO: an image's file_name is not on disk", "correct its file_name", coco_file_name_missing),
    Case("COCO: the json is cut short", "export it again", coco_not_json),
    Case("checkpoint: a text file named .pt (Git LFS pointer)", "Point it at a checkpoint", pt_text_file),
    Case("checkpoint: an empty .pt", "Replace the file", pt_empty),
    Case("checkpoint: a .pt cut short", "Copy the checkpoint again", pt_truncated),
    Case("checkpoint: a state_dict, not an ultralytics checkpoint", "written by ultralytics", pt_state_dict),
    Case("autolabel.proposer: a .pt holding a bare tensor", "written by ultralytics", proposer_tensor),
]


def markdown(base: Path) -> str:
    """The docs table: every case run in a fresh folder under ``base``, paths shown relative to it."""
    out = ["| input | what stops or records it | message |", "|---|---|---|"]
    for i, case in enumerate(CASES):
        d = base / f"case{i:02d}"
        d.mkdir(parents=True)
        told = case.make(d)
        msg = told.message.replace(str(d) + "/", "").replace("\n", " ").replace("|", "\\|")
        where = f"raises `{told.kind}` (run stops)" if told.stopped else f"{told.kind}, run goes on"
        out.append(f"| {case.name} | {where} | {msg} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    base = Path(tempfile.mkdtemp(prefix="wanwu-bad-inputs-"))
    try:
        print(markdown(base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
