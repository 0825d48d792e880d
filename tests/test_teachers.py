"""Teacher adapters: each one loads a small checkpoint this test builds in that family's exact file format, returns
probabilities over its own labels, batched, and maps its labels onto ontology ids. Nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wanwu.models import teachers as tz


def crops(n: int = 5, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def check_probs(p: np.ndarray, n: int, n_labels: int) -> None:
    assert p.shape == (n, n_labels) and p.dtype == np.float32
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)


# ---- the mapping onto the ontology ---------------------------------------------------------------------------


def test_mapping_uses_synonyms_in_both_languages_and_keeps_unknowns_as_other(ontology):
    labels = ["cat", "猫咪", "Mobile_Phone", "zebra", "玫瑰花", "other"]
    m = tz.OntologyMapping(labels, ontology)
    assert m.ids.tolist() == [0, 0, 8, -1, 6, -1]
    assert m.unmapped == ["zebra", "other"]
    p = np.array([[0.1, 0.25, 0.28, 0.15, 0.05, 0.17]], np.float32)
    onto = m.project(p)
    assert onto.shape == (1, len(ontology) + 1)
    assert onto[0, 0] == pytest.approx(0.35)  # cat + 猫咪
    assert onto[0, -1] == pytest.approx(0.32)  # zebra + other → "other", kept
    np.testing.assert_allclose(onto.sum(), 1.0, atol=1e-6)
    assert m.coverage[[0, 6, 8, -1]].all() and not m.coverage[1]
    ids, probs = tz.topk_ids(onto, 3)
    assert ids[0].tolist() == [0, -1, 8] and probs[0].tolist() == pytest.approx([0.35, 0.32, 0.28])


def test_square_crop_stays_inside_the_image():
    im = Image.new("RGB", (100, 80))
    c = tz.square_crop(im, (0, 0, 20, 10), context=1.5)  # at the corner: shifted in, not padded
    assert c.size == (30, 30)
    assert tz.square_crop(im, (10, 10, 90, 70), context=1.5).size == (120, 120)  # bigger than the image: padded


# ---- ultralytics classification ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ultralytics_cls(tmp_path_factory):
    """A yolo11n-cls checkpoint in ultralytics' own format (what its trainer saves), classes cat, rose, tiger,
    trained at imgsz 32 (the stage's training path itself is covered by test_autolabel)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(0)
    y = YOLO("yolo11n-cls.yaml")
    y.model = ClassificationModel("yolo11n-cls.yaml", nc=3, verbose=False)
    y.model.names = {0: "cat", 1: "rose", 2: "tiger"}
    y.ckpt = {"train_args": {"imgsz": 32, "task": "classify"}}
    path = tmp_path_factory.mktemp("cls") / "cls.pt"
    y.save(path)
    return path


def test_ultralytics_classifier_matches_ultralytics_predict_and_batches(ultralytics_cls, ontology):
    from ultralytics import YOLO

    t = tz.UltralyticsClassifier(ultralytics_cls, batch_size=2, device="cpu")
    assert t.labels == ["cat", "rose", "tiger"] and t.imgsz == 32
    cs = crops(5)
    p = t.predict_proba(cs)
    check_probs(p, 5, 3)
    assert t.calls == 3  # 5 crops in batches of 2
    # the same numbers as ultralytics' own predictor, one image at a time
    ref = np.stack(
        [r.probs.data.numpy() for c in cs for r in YOLO(ultralytics_cls).predict(c, imgsz=32, verbose=False)]
    )
    np.testing.assert_allclose(p, ref, atol=1e-4)
    m = tz.OntologyMapping(t.labels, ontology)
    assert m.ids.tolist() == [0, 6, -1]  # tiger is no class: other
    assert t.version() == tz.UltralyticsClassifier(ultralytics_cls).version()
    assert t.topk(cs[:1], k=2)[0][0][0] in t.labels


def test_a_detector_is_no_teacher_and_a_classifier_no_proposer(ultralytics_cls, tmp_path, ontology):
    from ultralytics import YOLO

    from wanwu.models.proposer import Proposer, ProposerError

    det = tmp_path / "det.pt"
    YOLO("yolo11n.yaml").save(det)
    with pytest.raises(tz.TeacherError, match="not a classifier"):
        tz.UltralyticsClassifier(det)
    with pytest.raises(ProposerError, match="not a detector"):
        Proposer(ultralytics_cls, ontology)


# ---- torchvision / timm --------------------------------------------------------------------------------------


def _reference(model: torch.nn.Module, cs: list[Image.Image], size: int, mean, std) -> np.ndarray:
    import torchvision.transforms as T

    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    with torch.no_grad():
        return np.concatenate([torch.softmax(model(tf(c)[None]), 1).numpy() for c in cs])


def test_torchvision_state_dict_with_labels_file(tmp_path, ontology):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "labels.txt").write_text("dog\nsunflower\nzebra\n")
    t = tz.TorchvisionClassifier(
        tmp_path / "w.pth",
        arch="mobilenet_v3_small",
        labels=tmp_path / "labels.txt",
        imgsz=64,
        batch_size=4,
        device="cpu",
    )
    cs = crops(5)
    p = t.predict_proba(cs)
    check_probs(p, 5, 3)
    assert t.calls == 2
    np.testing.assert_allclose(p, _reference(model, cs, 64, tz.IMAGENET_MEAN, tz.IMAGENET_STD), atol=1e-4)
    assert tz.OntologyMapping(t.labels, ontology).ids.tolist() == [1, 4, -1]


def test_timm_bundle_and_pickled_models_are_refused(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    bundle = {
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "arch": "test_resnet",
        "library": "timm",
        "labels": ["猫", "狗"],
        "imgsz": 48,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    torch.save(bundle, tmp_path / "bundle.pt")
    t = tz.TorchvisionClassifier(tmp_path / "bundle.pt", device="cpu")
    assert t.labels == ["猫", "狗"] and t.kind == "timm"
    cs = crops(3)
    np.testing.assert_allclose(t.predict_proba(cs), _reference(model, cs, 48, [0.5] * 3, [0.25] * 3), atol=1e-4)
    # a whole pickled module is code, not weights: refused with the fix
    torch.save(model, tmp_path / "pickled.pt")
    with pytest.raises(tz.TeacherError, match="weights_only"):
        tz.TorchvisionClassifier(tmp_path / "pickled.pt", arch="test_resnet", labels=["a", "b"], library="timm")
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a bare state_dict says nothing about itself
    with pytest.raises(tz.TeacherError, match="architecture and labels"):
        tz.TorchvisionClassifier(tmp_path / "plain.pt")


# ---- ModelScope general recognition --------------------------------------------------------------------------


def test_modelscope_general_recognition_model_dir(tmp_path, ontology):
    """A ResNeSt with ModelScope's file layout, shrunk to one block per stage: pytorch_model.pt (state_dict under
    'state_dict' with DataParallel's 'module.' prefixes) + meta_info.txt (label in column 2)."""
    import timm

    torch.manual_seed(0)
    labels = ["猫", "玫瑰花", "老虎", "东京铁塔"]
    ref = timm.create_model("resnest101e", pretrained=False, num_classes=4, layers=[1, 1, 1, 1], stem_width=8).eval()
    d = tmp_path / "cv_resnest101_general_recognition"
    d.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, d / "pytorch_model.pt")
    (d / "meta_info.txt").write_text(
        "".join(f"n{i:05d}\t{lbl}\t{i}\n" for i, lbl in enumerate(labels)), encoding="utf-8"
    )

    t = tz.ModelScopeGeneralRecognition(d, imgsz=64, batch_size=8, device="cpu")
    assert t.labels == labels and t.layout == {"layers": [1, 1, 1, 1], "stem_width": 8, "num_classes": 4}
    cs = crops(6)
    p = t.predict_proba(cs)
    check_probs(p, 6, 4)  # the full softmax, not ModelScope's top-1 logit
    assert t.calls == 1  # one batched pass, not one call per image
    # ModelScope's own preprocessing, one image at a time (Resize 256/224·s, CenterCrop s, ImageNet mean/std)
    import torchvision.transforms as T

    tf = T.Compose(
        [
            T.Resize(round(64 * 256 / 224)),
            T.CenterCrop(64),
            T.ToTensor(),
            T.Normalize(tz.IMAGENET_MEAN, tz.IMAGENET_STD),
        ]
    )
    with torch.no_grad():
        one_by_one = np.concatenate([torch.softmax(ref(tf(c)[None]), 1).numpy() for c in cs])
    np.testing.assert_allclose(p, one_by_one, atol=1e-4)
    top = t.topk(cs[:2], k=3)
    assert len(top) == 2 and len(top[0]) == 3 and top[0][0][1] >= top[0][1][1]
    assert tz.OntologyMapping(t.labels, ontology).ids.tolist() == [0, 6, -1, 13]


def test_modelscope_layout_reads_resnest101(tmp_path):
    import timm

    m = timm.create_model("resnest101e", pretrained=False, num_classes=7)
    assert tz.resnest_layout(m.state_dict()) == {"layers": [3, 4, 23, 3], "stem_width": 64, "num_classes": 7}
    (tmp_path / "meta_info.txt").write_text("a\tb\n")
    with pytest.raises(tz.TeacherError, match="pytorch_model.pt"):
        tz.ModelScopeGeneralRecognition(tmp_path)


# ---- open_clip zero-shot -------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tiny_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.model.CLIP(**TINY_CLIP).eval()


def test_open_clip_zero_shot_from_a_local_folder(tmp_path, ontology):
    import open_clip
    from safetensors.torch import save_file

    model = _tiny_clip()
    d = tmp_path / "tiny-clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "open_clip_model.safetensors")

    t = tz.OpenClipZeroShot(f"local-dir:{d}", ontology, batch_size=4, device="cpu")
    assert t.labels == [c.en for c in ontology.classes] + ["other"]
    assert t.prompts[0] == ["一张猫的照片", "a photo of a cat"]  # Chinese and English prompts of the ontology
    cs = crops(5)
    p = t.predict_proba(cs)
    check_probs(p, 5, len(ontology) + 1)
    assert t.calls == 2
    m = tz.OntologyMapping(t.labels, ontology)
    assert m.ids.tolist() == [*range(len(ontology)), -1]
    # the same as open_clip by hand
    tok = open_clip.get_tokenizer(f"local-dir:{d}")
    _, _, pre = open_clip.create_model_and_transforms(f"local-dir:{d}")
    with torch.no_grad():
        text = []
        for group in t.prompts:
            e = model.encode_text(tok(group))
            e = e / e.norm(dim=-1, keepdim=True)
            text.append(e.mean(0) / e.mean(0).norm())
        img = model.encode_image(torch.stack([pre(c) for c in cs]))
        img = img / img.norm(dim=-1, keepdim=True)
        ref = torch.softmax(model.logit_scale.exp() * img @ torch.stack(text).T, 1).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-4)


def test_open_clip_with_a_model_config_and_weights_file(tmp_path, ontology):
    model = _tiny_clip()
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "wanwu-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    t = tz.build_teacher(
        {"kind": "open_clip", "arch": "wanwu-tiny-clip", "path": str(tmp_path / "weights.pt"), "config": str(cfg)},
        ontology,
        device="cpu",
    )
    check_probs(t.predict_proba(crops(2)), 2, len(ontology) + 1)
    with pytest.raises(tz.TeacherError, match="nothing is downloaded"):
        tz.OpenClipZeroShot("ViT-B-32", ontology)
