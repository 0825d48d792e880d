"""`wanwu serve` over real HTTP on loopback: recognition with Chinese and English labels, limits with clear 4xx
answers, the token, metrics, micro-batching, hot swaps from a file and from the MLflow registry with requests in
flight, and the cascade with a real (tiny) torch teacher. Models are tiny YOLO11n ONNX exports built here."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _tiny_detector import build_tiny_detector, detector_variant
from PIL import Image

from wanwu.config import ServeParams
from wanwu.offline import harden
from wanwu.ontology import Ontology

ROOT = Path(__file__).resolve().parents[1]
ONTO = Ontology.load(ROOT / "ontology.yaml")


# ---- fixtures and helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 says 猫 (0.95), v2 says 狗 (0.95), low says 猫 at 0.38 (below a cascade threshold of 0.5)."""
    harden(ROOT)
    folder = tmp_path_factory.getbasetemp() / "serve-models"
    base = build_tiny_detector(folder, imgsz=64)
    return {
        "v1": base,
        "v2": detector_variant(base, folder / "v2.onnx", hot_class=1),
        "low": detector_variant(base, folder / "low.onnx", hot_class=0, hot_logit=-0.5),
    }


def image_bytes(w: int = 96, h: int = 64, colour=(200, 40, 40), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), colour)
    img.paste((20, 20, 20), (w // 4, h // 4, w // 2, h // 2))
    img.save(buf, fmt)
    return buf.getvalue()


@contextlib.contextmanager
def live(app):
    """Run the app with uvicorn in a thread on a free loopback port; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_for(url: str, pred, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        r = httpx.get(f"{url}/health", timeout=5)
        last = r.json()
        if pred(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"/health never reached the expected state; last: {last}")


def ready(url: str) -> dict:
    return wait_for(url, lambda h: h["ready"])


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def app_for(source, **overrides):
    from wanwu.serve import create_app

    return create_app(ServeParams(**{"reload_interval": 0.2, **overrides}), source, ONTO)


def post(url: str, *images: tuple[str, bytes, str], headers: dict | None = None) -> httpx.Response:
    files = [("images", im) for im in images]
    return httpx.post(f"{url}/recognize", files=files, headers=headers, timeout=30)


# ---- the detector itself -------------------------------------------------------------------------------------
def test_onnx_detector_matches_ultralytics_predict(models):
    """Our letterbox, decoding and NMS give ultralytics' own boxes on a non-square image (many boxes, low conf)."""
    from ultralytics import YOLO

    from wanwu.onnx_model import OnnxDetector

    img = np.asarray(Image.open(io.BytesIO(image_bytes(150, 90))).convert("RGB"))[..., ::-1].copy()
    ours = OnnxDetector(models["v1"], conf=1e-4, iou=0.7).predict([img])[0]
    ref = YOLO(str(models["v1"]), task="detect").predict(img, imgsz=64, conf=1e-4, iou=0.7, verbose=False)[0]
    assert len(ours) == len(ref.boxes) > 1
    order_o = np.lexsort((ours.boxes[:, 0], -ours.scores))
    order_r = np.lexsort((ref.boxes.xyxy.numpy()[:, 0], -ref.boxes.conf.numpy()))
    np.testing.assert_allclose(ours.boxes[order_o], ref.boxes.xyxy.numpy()[order_r], atol=0.5)
    np.testing.assert_allclose(ours.scores[order_o], ref.boxes.conf.numpy()[order_r], atol=1e-4)
    assert (ours.classes[order_o] == ref.boxes.cls.numpy()[order_r].astype(int)).all()


def test_batched_run_equals_one_by_one(models):
    """A batch of different sizes padded onto one canvas gives each image the boxes it gets alone, in its pixels.

    (Near-zero scores of anchors in the extra padding may differ, as with any letterbox size: compared above 0.5.)
    """
    from wanwu.onnx_model import OnnxDetector

    det = OnnxDetector(models["v1"], conf=0.5)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (40, 100), (120, 30))]
    together = det.predict(imgs)
    for im, got in zip(imgs, together, strict=True):
        alone = det.predict([im])[0]
        assert len(alone) == len(got) == 1
        np.testing.assert_allclose(got.scores, alone.scores, atol=2e-3)
        np.testing.assert_allclose(got.boxes, alone.boxes, atol=1.0)
        assert got.boxes[0, 2] <= im.shape[1] and got.boxes[0, 3] <= im.shape[0]


def test_reduced_jpeg_factor_never_goes_below_the_letterbox_size():
    from wanwu.onnx_model import reduced_jpeg_factor

    assert reduced_jpeg_factor((480, 640), (320, 320)) == 2
    assert reduced_jpeg_factor((3000, 4000), (320, 320)) == 8
    assert reduced_jpeg_factor((1280, 1280), (320, 320)) == 4
    assert reduced_jpeg_factor((600, 600), (320, 320)) == 1  # 1/2 would be 300 < 320
    assert reduced_jpeg_factor((100, 700), (320, 320)) == 2  # fits by its long side either way it is turned
    for hw in ((480, 640), (3000, 4000), (100, 700), (333, 999)):
        f = reduced_jpeg_factor(hw, (320, 256))
        r = max(min(320 / hw[0], 256 / hw[1]), min(320 / hw[1], 256 / hw[0]))
        assert f * r <= 1 < (2 * f) * r or f == 8


def _photo(w: int, h: int, orientation: int | None = None) -> bytes:
    """A JPEG with texture and a dark block (the tiny model's 猫); optionally stored turned, with an EXIF tag."""
    rng = np.random.default_rng(w * h)
    arr = (rng.integers(90, 230, (h, w, 3))).astype(np.uint8)
    arr[h // 5 : h // 2, w // 3 : (2 * w) // 3] = 15
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, "JPEG", quality=92)
    else:  # store the pixels turned back; the tag tells readers to turn them upright
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def test_large_jpegs_decode_reduced_with_the_same_boxes_in_the_picture_s_own_pixels(models):
    """640×400 for a 64 px model decodes at 1/8; sizes and boxes are those of the full decode (EXIF turn too)."""
    from wanwu.serve import FileSource

    uploads = [("flat.jpg", _photo(640, 400), "image/jpeg"), ("turned.jpg", _photo(640, 400, 6), "image/jpeg")]
    answers = {}
    for reduced in (False, True):
        with live(app_for(FileSource(models["v1"]), reduced_decode=reduced, conf=0.3)) as url:
            ready(url)
            r = post(url, *uploads)
            assert r.status_code == 200, r.text
            answers[reduced] = r.json()["images"]
    full, small = answers[False], answers[True]
    assert [(i["width"], i["height"]) for i in full] == [(640, 400), (640, 400)]  # EXIF 6 turned it back upright
    assert [(i["width"], i["height"]) for i in small] == [(i["width"], i["height"]) for i in full]
    for a, b in zip(full, small, strict=True):
        assert a["boxes"] and len(a["boxes"]) == len(b["boxes"])
        for x, y in zip(a["boxes"], b["boxes"], strict=True):
            assert x["label_zh"] == y["label_zh"] == "猫" and abs(x["confidence"] - y["confidence"]) < 0.05
            bx = np.array([x["x1"], x["y1"], x["x2"], x["y2"]])
            by = np.array([y["x1"], y["y1"], y["x2"], y["y2"]])
            inter = np.prod(np.clip(np.minimum(bx[2:], by[2:]) - np.maximum(bx[:2], by[:2]), 0, None))
            union = np.prod(bx[2:] - bx[:2]) + np.prod(by[2:] - by[:2]) - inter
            assert inter / union > 0.9, (x, y)


# ---- HTTP --------------------------------------------------------------------------------------------------
def test_recognize_one_and_several_images_with_chinese_and_english_labels(models):
    from wanwu.serve import FileSource

    with live(app_for(FileSource(models["v1"]))) as url:
        h = ready(url)
        assert h["status"] == "ready" and h["model_version"].startswith("sha256:") and h["classes"] == 16
        r = post(url, ("cat.jpg", image_bytes(), "image/jpeg"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == h["model_version"]
        [im] = body["images"]
        assert (im["filename"], im["width"], im["height"]) == ("cat.jpg", 96, 64)
        box = im["boxes"][0]
        assert (box["label_zh"], box["label_en"], box["class_id"]) == ("猫", "cat", 0)
        assert 0.9 < box["confidence"] <= 1 and box["source"] == "detector"
        assert 0 <= box["x1"] < box["x2"] <= 96 and 0 <= box["y1"] < box["y2"] <= 64

        r = post(
            url,
            ("a.jpg", image_bytes(320, 200), "image/jpeg"),
            ("b.png", image_bytes(50, 120, fmt="PNG"), "image/png"),
            ("c.webp", image_bytes(64, 64, fmt="WEBP"), "image/webp"),
        )
        assert r.status_code == 200, r.text
        ims = r.json()["images"]
        assert [(i["filename"], i["width"], i["height"]) for i in ims] == [
            ("a.jpg", 320, 200),
            ("b.png", 50, 120),
            ("c.webp", 64, 64),
        ]
        assert all(i["boxes"] and i["boxes"][0]["label_zh"] == "猫" for i in ims)
        assert metric(url, "wanwu_images_total") == 4
        assert metric(url, "wanwu_requests_total", endpoint="/recognize", status="200") == 2
        assert metric(url, "wanwu_model_info", version=h["model_version"]) == 1


def test_limits_answer_with_clear_4xx(models):
    from wanwu.serve import FileSource

    app = app_for(
        FileSource(models["v1"]), max_image_bytes=3000, max_request_bytes=20000, max_images=3, max_pixels=20000
    )
    small = image_bytes(64, 48)
    assert len(small) < 3000
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(noisy, "PNG")
    with live(app) as url:
        ready(url)

        def refused(r: httpx.Response, status: int, code: str, field: str) -> dict:
            assert r.status_code == status, r.text
            body = r.json()
            assert body["code"] == code and body["field"] == field and body["detail"], body
            return body

        body = refused(post(url, ("big.png", noisy.getvalue(), "image/png")), 413, "too_large", "images[0]")
        assert body["limit"] == 3000 and "3000" in body["detail"] and "big.png" in body["detail"]
        body = refused(post(url, *[("x.jpg", small, "image/jpeg")] * 4), 422, "too_many_images", "images")
        assert body["limit"] == 3
        body = refused(
            httpx.post(f"{url}/recognize", files=[("images", ("x.jpg", b"0" * 30000, "image/jpeg"))]),
            413,
            "too_large",
            "body",
        )
        assert body["limit"] == 20000
        wide = image_bytes(400, 60, fmt="PNG")  # 24 000 pixels > 20 000, few bytes
        body = refused(post(url, ("wide.png", wide, "image/png")), 413, "too_many_pixels", "images[0]")
        assert body["observed"] == 24000 and body["limit"] == 20000
        body = refused(post(url, ("notes.txt", b"hello", "text/plain")), 415, "unsupported_media_type", "images[0]")
        assert "text/plain" in body["detail"] and "image/jpeg" in body["limit"]
        body = refused(
            httpx.post(f"{url}/recognize", json={"image": "x"}), 415, "unsupported_media_type", "Content-Type"
        )
        assert "multipart/form-data" in body["detail"]
        body = refused(
            post(url, ("broken.jpg", b"\xff\xd8\xff" + b"garbage" * 10, "image/jpeg")), 422, "undecodable", "images[0]"
        )
        assert "broken.jpg" in body["detail"]
        body = refused(
            httpx.post(f"{url}/recognize", files=[("photo", ("x.jpg", small, "image/jpeg"))]),
            422,
            "missing_images",
            "images",
        )
        assert "photo" in body["detail"]
        assert metric(url, "wanwu_errors_total", reason="too_large") == 2
        assert metric(url, "wanwu_requests_total", endpoint="/recognize", status="413") == 3
        # still serving
        assert post(url, ("ok.jpg", small, "image/jpeg")).status_code == 200


def test_api_token_from_the_environment(models, monkeypatch, tmp_path):
    from wanwu.config import Params
    from wanwu.serve import build

    monkeypatch.setenv("WANWU_API_TOKEN", "s3cret-token")
    params = Params.model_validate({"serve": {"reload_interval": 0.2}}).resolve(ROOT)
    with live(build(params, ROOT, model=models["v1"])) as url:
        assert ready(url)["ready"]  # health stays open for probes
        img = ("a.jpg", image_bytes(), "image/jpeg")
        r = post(url, img)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["field"] == "Authorization" and "WANWU_API_TOKEN" in r.json()["detail"]
        assert post(url, img, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, img, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        schema = httpx.get(f"{url}/openapi.json").json()
        assert schema["paths"]["/recognize"]["post"]["security"]


def test_concurrent_requests_are_micro_batched(models):
    from wanwu.serve import FileSource

    with live(app_for(FileSource(models["v1"]), batch_window_ms=50, max_batch=8)) as url:
        ready(url)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                rs = await asyncio.gather(
                    *[
                        c.post("/recognize", files=[("images", (f"{i}.jpg", image_bytes(), "image/jpeg"))])
                        for i in range(16)
                    ]
                )
            return [r.status_code for r in rs]

        assert asyncio.run(burst()) == [200] * 16
        calls = metric(url, "wanwu_batch_size_count")
        images = metric(url, "wanwu_batch_size_sum")
        assert images == 16 and calls < 16, f"{calls} onnxruntime calls for 16 images: no batching"
        assert metric(url, "wanwu_batch_size_bucket", le="1.0") < calls  # some batch held more than one image


def test_no_onnxruntime_call_exceeds_the_default_batch_bound(models):
    """The shipped max_batch holds under a burst and for one request with more images than it: such a request is
    answered whole, in several calls."""
    from wanwu.serve import FileSource

    bound = ServeParams().max_batch
    many = bound + 2
    with live(app_for(FileSource(models["v1"]), batch_window_ms=50)) as url:
        ready(url)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                one = [("images", ("1.jpg", image_bytes(), "image/jpeg"))]
                several = [("images", (f"{k}.jpg", image_bytes(), "image/jpeg")) for k in range(many)]
                return await asyncio.gather(
                    *[c.post("/recognize", files=one) for _ in range(12)], c.post("/recognize", files=several)
                )

        rs = asyncio.run(burst())
        assert [r.status_code for r in rs] == [200] * 13
        assert len(rs[-1].json()["images"]) == many
        calls = metric(url, "wanwu_batch_size_count")
        assert metric(url, "wanwu_batch_size_sum") == 12 + many
        within = metric(url, "wanwu_batch_size_bucket", le=f"{bound:.1f}")
        assert within > 0, f"max_batch {bound} is not a bound of the wanwu_batch_size histogram: add it there"
        assert within == calls  # every call within the bound
        assert metric(url, "wanwu_batch_size_bucket", le="1.0") < calls  # and batching still at work


def test_a_full_queue_answers_503_busy_and_the_server_goes_on(models):
    """Jobs are queued by the decode threads: past serve.max_queue a request gets 503 busy with Retry-After, the
    queued ones are answered, and the server serves again once the burst has passed. A slow teacher (the cascade,
    0.4 s a call, one call at a time) keeps the inference threads busy while the burst arrives."""
    from wanwu.serve import FileSource, create_app

    class SlowTeacher(ColourTeacher):
        def predict_proba(self, crops: list) -> np.ndarray:
            time.sleep(0.4)
            return super().predict_proba(crops)

    teacher = SlowTeacher()
    params = ServeParams(reload_interval=0.2, cascade=True, cascade_threshold=0.5, max_queue=1, max_batch=1)
    with live(create_app(params, FileSource(models["low"]), ONTO, teacher=teacher)) as url:
        ready(url)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(
                    *[  # a colour each: no answer comes from the cascade's cache
                        c.post("/recognize", files=[("images", (f"{i}.jpg", image_bytes(colour=(20 * i, 9, 9))))])
                        for i in range(10)
                    ]
                )

        rs = asyncio.run(burst())
        statuses = sorted(r.status_code for r in rs)
        busy = [r for r in rs if r.status_code == 503]
        assert set(statuses) == {200, 503}, statuses
        assert statuses.count(200) >= 2  # at least one batch running and the one queued behind it
        for r in busy:
            assert r.json()["code"] == "busy" and r.json()["limit"] == 1 and r.headers["retry-after"] == "1"
        assert metric(url, "wanwu_errors_total", reason="busy") == len(busy)
        assert teacher.crops_seen == statuses.count(200)  # a refused request never reached the model
        assert post(url, ("after.jpg", image_bytes(colour=(1, 200, 1)), "image/jpeg")).status_code == 200


def _hammer(url: str, stop: threading.Event, out: list, clients: int = 4) -> None:
    """Requests from `clients` concurrent clients until `stop`; records (status, version, labels)."""

    async def worker(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await c.post("/recognize", files=[("images", ("x.jpg", image_bytes(), "image/jpeg"))])
            if r.status_code == 200:
                b = r.json()
                out.append((200, b["model_version"], {bx["label_zh"] for bx in b["images"][0]["boxes"]}))
            else:
                out.append((r.status_code, None, r.text))

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            await asyncio.gather(*[worker(c) for _ in range(clients)])

    asyncio.run(main())


def test_hot_swap_of_a_file_and_a_broken_file_keeps_serving(models, tmp_path):
    import shutil

    from wanwu.serve import FileSource

    served = tmp_path / "model.onnx"
    shutil.copyfile(models["v1"], served)
    with live(app_for(FileSource(served))) as url:
        v1 = ready(url)["model_version"]
        out: list = []
        stop = threading.Event()
        t = threading.Thread(target=_hammer, args=(url, stop, out))
        t.start()
        try:
            time.sleep(0.5)
            (tmp_path / "broken.onnx").write_bytes(b"not an onnx graph")
            os.replace(tmp_path / "broken.onnx", served)
            h = wait_for(url, lambda h: h["last_error"] is not None)
            assert h["model_version"] == v1 and "failed to load" in h["last_error"]
            shutil.copyfile(models["v2"], tmp_path / "next.onnx")
            os.replace(tmp_path / "next.onnx", served)
            v2 = wait_for(url, lambda h: h["model_version"] != v1)["model_version"]
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(30)
        assert out and all(s == 200 for s, _, _ in out), [o for o in out if o[0] != 200][:3]
        assert {v for _, v, _ in out} == {v1, v2}
        assert all(labels == ({"猫"} if v == v1 else {"狗"}) for _, v, labels in out)
        assert metric(url, "wanwu_model_loads_total", outcome="error") == 1


@contextlib.contextmanager
def _tracking(uri: str):
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = before


def test_hot_swap_when_champion_moves_in_the_registry_no_request_fails(models, tmp_path):
    """Not ready before a champion exists; then serves v1; the alias moves to v2 under load: zero failures."""
    import mlflow
    import onnx
    from mlflow import MlflowClient

    from wanwu.serve import RegistrySource

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reqs = ["onnxruntime"]  # given: MLflow's own inference of requirements takes seconds per model
    with _tracking(uri):
        client = MlflowClient(uri)
        exp = client.create_experiment("serve-test", artifact_location=(tmp_path / "art").as_uri())
        versions = {}
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.onnx.log_model(
                onnx.load(str(models["v1"])),
                name="model",
                registered_model_name="wanwu-detector",
                pip_requirements=reqs,
            )
        versions["v1"] = str(info.registered_model_version)
        # v2 as wanwu.registry lays a version out: the registered model is something else (there, the pyfunc;
        # here, a decoy that would say 猫) and the tag wanwu.onnx_model_uri names the bare ONNX flavour to serve.
        with mlflow.start_run(experiment_id=exp):
            bare = mlflow.onnx.log_model(onnx.load(str(models["v2"])), name="onnx", pip_requirements=reqs)
            decoy = mlflow.onnx.log_model(onnx.load(str(models["v1"])), name="detector", pip_requirements=reqs)
        mv = mlflow.register_model(decoy.model_uri, "wanwu-detector", tags={"wanwu.onnx_model_uri": bare.model_uri})
        versions["v2"] = str(mv.version)

        source = RegistrySource("wanwu-detector", "champion", tmp_path / "cache", tracking_uri=uri)
        with live(app_for(source)) as url:
            h = httpx.get(f"{url}/health").json()
            assert httpx.get(f"{url}/health").status_code == 503 and not h["ready"]
            assert "nothing to serve" in wait_for(url, lambda h: h["last_error"] is not None)["last_error"]
            r = post(url, ("x.jpg", image_bytes(), "image/jpeg"))
            assert r.status_code == 503 and r.json()["code"] == "not_ready"

            client.set_registered_model_alias("wanwu-detector", "champion", versions["v1"])
            assert ready(url)["model_version"] == versions["v1"]
            out: list = []
            stop = threading.Event()
            t = threading.Thread(target=_hammer, args=(url, stop, out))
            t.start()
            try:
                time.sleep(0.7)
                client.set_registered_model_alias("wanwu-detector", "champion", versions["v2"])
                wait_for(url, lambda h: h["model_version"] == versions["v2"])
                time.sleep(0.7)
            finally:
                stop.set()
                t.join(30)
            assert len(out) > 10 and all(s == 200 for s, _, _ in out), [o for o in out if o[0] != 200][:3]
            seen = [v for _, v, _ in out]
            assert set(seen) == {versions["v1"], versions["v2"]}
            assert seen.index(versions["v2"]) > 0 and versions["v1"] not in seen[seen.index(versions["v2"]) + 8 :]
            assert all(labels == ({"猫"} if v == versions["v1"] else {"狗"}) for _, v, labels in out)
            assert metric(url, "wanwu_model_version") == float(versions["v2"])
            assert metric(url, "wanwu_model_loads_total", outcome="ok") == 2
            assert metric(url, "wanwu_errors_total") == 1  # the one not_ready request above


# ---- the cascade ---------------------------------------------------------------------------------------------
class ColourTeacher:
    """A real tiny torch classifier over the 16 ontology ids: mean colour → logits; red is 玫瑰, blue is 鱼."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 16))
        with torch.no_grad():
            fc = self.net[2]
            fc.weight.zero_()
            fc.bias.zero_()
            fc.weight[6] = torch.tensor([8.0, -4.0, -4.0])  # 玫瑰 rose
            fc.weight[3] = torch.tensor([-4.0, -4.0, 8.0])  # 鱼 fish
        self.crops_seen = 0

    def predict_proba(self, crops: list) -> np.ndarray:
        torch = self.torch
        self.crops_seen += len(crops)
        x = torch.stack(
            [torch.from_numpy(np.asarray(c.convert("RGB").resize((32, 32)), np.float32) / 255) for c in crops]
        )
        with torch.no_grad():
            return torch.softmax(self.net(x.permute(0, 3, 1, 2)), 1).numpy()


def test_cascade_renames_low_confidence_boxes_with_a_cached_teacher(models):
    from wanwu.serve import FileSource, create_app

    teacher = ColourTeacher()
    params = ServeParams(reload_interval=0.2, cascade=True, cascade_threshold=0.5)
    with live(create_app(params, FileSource(models["low"]), ONTO, teacher=teacher)) as url:
        assert ready(url)["cascade"] is True
        red = ("red.jpg", image_bytes(80, 80, colour=(250, 0, 0)), "image/jpeg")
        blue = ("blue.png", image_bytes(80, 80, colour=(0, 0, 250), fmt="PNG"), "image/png")
        r = post(url, red, blue)
        assert r.status_code == 200, r.text
        [b_red], [b_blue] = (im["boxes"] for im in r.json()["images"])
        assert b_red["confidence"] < 0.5 and b_red["source"] == "teacher"
        assert (b_red["label_zh"], b_red["label_en"], b_red["class_id"]) == ("玫瑰", "rose", 6)
        assert (b_blue["label_zh"], b_blue["label_en"]) == ("鱼", "fish") and b_blue["teacher_confidence"] > 0.5
        assert teacher.crops_seen == 2
        assert post(url, red).json()["images"][0]["boxes"][0]["label_en"] == "rose"
        assert teacher.crops_seen == 2  # the same crop: answered from the content-hash cache
        assert metric(url, "wanwu_cascade_cache_hits_total") == 1
        assert metric(url, "wanwu_cascade_relabelled_total") == 3


def test_cascade_off_by_default_and_its_gain_is_measured(models):
    from wanwu.onnx_model import OnnxDetector
    from wanwu.serve import Sample, measure_cascade

    assert ServeParams().cascade is False
    det = OnnxDetector(models["low"])
    samples = []
    for colour, label in (((250, 0, 0), 6), ((0, 0, 250), 3), ((240, 10, 10), 6)):
        img = np.asarray(Image.new("RGB", (64, 64), colour))[..., ::-1].copy()
        samples.append(Sample(img, np.array([[0, 0, 64, 64]], np.float32), np.array([label])))
    m = measure_cascade(det, ColourTeacher(), ONTO, samples, threshold=0.5)
    assert m["matched_boxes"] == 3 and m["relabelled_boxes"] == 3
    assert m["label_accuracy_detector"] == 0.0 and m["label_accuracy_cascade"] == 1.0
    assert m["map50_cascade"] == pytest.approx(1.0) and m["map50_detector"] == 0.0
    assert m["ms_per_image_cascade"] >= m["ms_per_image_detector"] > 0


def test_cascade_crops_are_autolabel_style_squares():
    """Square, context × the longer side, shifted inside the image; zero padding only where it cannot fit."""
    from wanwu.serve import Cascade

    img = np.full((100, 200, 3), 7, np.uint8)
    c = Cascade(lambda crops: np.zeros((len(crops), 16)), 0.5, ONTO, context=1.5)
    assert c.crop(img, np.array([90, 40, 110, 60])).shape == (30, 30, 3)
    edge = c.crop(img, np.array([0, 0, 20, 10]))  # shifted in, not padded
    assert edge.shape == (30, 30, 3) and (edge == 7).all()
    big = c.crop(img, np.array([0, 0, 200, 100]))  # 300 × 300 around a 200 × 100 image: padded
    assert big.shape == (300, 300, 3) and (big == 0).any() and (big == 7).sum() == 200 * 100 * 3
    assert c.crop(img, np.array([5, 5, 5.5, 30])) is None


def test_cascade_crops_as_its_teacher_was_trained_unless_told():
    """serve.cascade_context null: the fused teacher's own crop context (what autolabel trained and fused it on)."""
    from wanwu.serve import Cascade

    class Fused:
        context = 1.3

        def predict_proba(self, crops):
            return np.zeros((len(crops), 16))

    img = np.full((100, 200, 3), 7, np.uint8)
    box = np.array([90, 40, 110, 60])
    assert Cascade(Fused(), 0.5, ONTO).crop(img, box).shape == (26, 26, 3)
    assert Cascade(Fused(), 0.5, ONTO, context=1.5).crop(img, box).shape == (30, 30, 3)
    assert Cascade(lambda crops: np.zeros((len(crops), 16)), 0.5, ONTO).crop(img, box).shape == (20, 20, 3)


def test_a_failing_teacher_degrades_to_the_detector_labels(models):
    from wanwu.serve import FileSource, create_app

    def broken(crops):
        raise RuntimeError("teacher weights missing")

    params = ServeParams(reload_interval=0.2, cascade=True, cascade_threshold=0.5)
    with live(create_app(params, FileSource(models["low"]), ONTO, teacher=broken)) as url:
        ready(url)
        r = post(url, ("x.jpg", image_bytes(), "image/jpeg"))
        assert r.status_code == 200
        box = r.json()["images"][0]["boxes"][0]
        assert (box["label_zh"], box["source"]) == ("猫", "detector")
        assert metric(url, "wanwu_errors_total", reason="cascade_failed") == 1
