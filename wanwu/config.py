"""params.yaml → typed records.

params.yaml holds the ML knobs, one section per stage (the same name as the stage); the environment holds the
infrastructure (tracking URI, Prefect API, remotes). It is parsed once, at the entry point; each task receives
its own section's record and never opens params.yaml itself. Keys under ``train``, ``distill`` and ``export``
use ultralytics' own names and pass straight through.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

STAGES = ("collect", "autolabel", "quality", "train", "distill", "evaluate", "export", "promote")


class ParamsError(ValueError):
    """params.yaml is missing, malformed or holds a value that is not allowed; names the key and the fix."""


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored knob.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SourceSpec(_Section):
    """One place images come from.

    ``uri`` is a folder (read recursively), a glob, a ``.txt`` file of http(s) URLs, an archive (.zip/.tar*),
    ``sample://?n=…&seed=…`` or a labeled dataset (``format`` yolo / voc / coco / folders). Relative paths are
    relative to the project root. ``format: auto`` detects: a ``*.yaml`` with ``names`` beside ``labels/`` → yolo,
    ``annotations/*.xml`` → voc, a json with ``images`` and ``annotations`` → coco, else plain images; class
    folders (``root/[split/]<class>/*.jpg``) must be asked for with ``format: folders``. See wanwu/sources.py.
    """

    uri: str
    format: Literal["auto", "images", "yolo", "voc", "coco", "folders", "urls", "archive", "sample"] = "auto"
    role: Literal["auto", "pool", "seed", "gold"] = Field(
        "auto",
        description="pool: unlabeled; seed: human-labeled training data; gold: held-out test set (test only). "
        "auto: labeled datasets are seed, everything else pool; sample:// splits itself.",
    )
    class_map: dict[str, str] = Field(
        default_factory=dict, description="dataset class name → ontology name; unmapped names are looked up as they are"
    )


class ProjectParams(_Section):
    data_dir: Path = Path("data")
    ontology: Path = Path("ontology.yaml")
    seed: int = 0
    device: str = Field("auto", description="auto picks cuda:0 when a GPU is there, else cpu")


class CollectParams(_Section):
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(uri="sample://?n=600&seed=0")])
    jpeg_quality: int = Field(95, ge=50, le=100)
    max_bytes: int = Field(50_000_000, gt=0, description="larger files are rejected unread")
    max_pixels: int = Field(40_000_000, gt=0, description="decompression-bomb guard: width × height above this")
    min_side: int = Field(16, ge=1, description="images smaller than this on either side are rejected")
    near_dup_distance: int = Field(4, ge=0, le=64, description="perceptual-hash Hamming distance that counts as near")
    url_timeout: float = Field(10.0, gt=0)
    url_retries: int = Field(2, ge=0)
    workers: int = Field(4, ge=1)

    @field_validator("sources", mode="before")
    @classmethod
    def _strings_are_uris(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"uri": s} if isinstance(s, str) else s for s in v]
        return v

    def resolve(self, root: Path) -> CollectParams:
        """Relative file, folder and glob sources are relative to the project root, not the working directory."""
        out = []
        for s in self.sources:
            if "://" in s.uri or Path(s.uri).is_absolute():
                out.append(s)
            else:
                out.append(s.model_copy(update={"uri": str(root / s.uri)}))
        return self.model_copy(update={"sources": out})


class _UltralyticsArgs(_Section):
    """Training knobs under ultralytics' own names; they pass straight through to ``model.train``.

    Any other ultralytics argument goes under ``extra`` (checked against ultralytics' own list at run time).
    ``None`` leaves ultralytics' default; ``seed: null`` takes ``project.seed``; the device is ``project.device``.
    """

    epochs: int = Field(7, ge=1)
    time: float | None = Field(None, gt=0, description="hard budget in hours: ultralytics fits the epochs into it")
    imgsz: int = Field(256, ge=32)
    batch: int | float = 8
    seed: int | None = None
    deterministic: bool = True
    cache: bool | Literal["ram", "disk"] = "ram"
    workers: int = Field(0, ge=0, description="dataloader processes; ultralytics forces 0 on the CPU anyway")
    amp: bool | Literal["bf16", "fp16", "fp32"] = Field(
        "bf16",
        description="training precision (ultralytics' key). bf16: mixed bfloat16 on a GPU that has it (else fp16 "
        "AMP) and, unlike ultralytics, on a CPU that has it (AVX512-BF16, AMX, Arm BF16; else fp32): the same "
        "gold mAP50 at ~1.4x the speed on the 2-core machine. true: ultralytics' fp16 AMP (GPU only); false: fp32",
    )
    channels_last: bool | None = Field(
        None,
        description="the training network's memory layout (ultralytics' key). null: channels-last on CUDA (as "
        "ultralytics does) and, unlike ultralytics, on an x86 CPU with oneDNN, where it trains ~15 % faster; "
        "true / false: always / never",
    )
    optimizer: str = "AdamW"
    lr0: float | None = Field(0.002, gt=0, description="ignored by optimizer auto, which picks its own")
    nbs: int | None = Field(
        8,
        ge=1,
        description="nominal batch: gradients accumulate up to it. ultralytics' 64 leaves a few hundred images a "
        "handful of optimizer steps per epoch; the CPU profile steps every batch",
    )
    warmup_epochs: float | None = Field(1.0, ge=0)
    patience: int = Field(100, ge=0)
    close_mosaic: int = Field(2, ge=0)
    mosaic: float = Field(1.0, ge=0, le=1)
    extra: dict[str, Any] = Field(default_factory=dict, description="any other ultralytics train argument")

    def ultralytics_args(self, project_seed: int = 0) -> dict[str, Any]:
        """The keyword arguments for ultralytics, ``extra`` last (it wins)."""
        own = self.model_dump(include=set(_UltralyticsArgs.model_fields) - {"extra"})
        args = {k: v for k, v in own.items() if v is not None}
        args["seed"] = project_seed if self.seed is None else self.seed
        return {**args, **self.extra}


class _StudentArgs(_UltralyticsArgs):
    """The student's runs (train, distill): ultralytics' arguments and how often to validate."""

    val_period: int = Field(
        1,
        ge=1,
        description="validate every N epochs and after the last (wanwu's knob, not an ultralytics argument): the "
        "epochs between log no val metrics and cannot become best.pt. 1: every epoch, as ultralytics does",
    )


class TrainParams(_StudentArgs):
    """The baseline student: ultralytics on the quality stage's dataset with hard labels."""

    model: str = Field(
        "data/autolabel/proposer/best.pt",
        description="starting point: a checkpoint (fine-tune; matching weights transfer) or a model yaml (scratch); "
        "relative paths are relative to the project folder",
    )
    fallback_model: str = Field("yolo11n.yaml", description="used when `model` is a checkpoint that does not exist")


class DistillParams(_StudentArgs):
    """The distilled student: fine-tunes the baseline with the teacher's soft labels and/or feature distillation."""

    model: str = Field("data/train/best.pt", description="starting point: the baseline student")
    mode: Literal["soft", "feature", "both"] = Field(
        "soft",
        description="soft: KD on the class distribution with the teacher's soft labels; feature: ultralytics' "
        "distill_model from a larger detector trained in the same run; both: the two together",
    )
    temperature: float = Field(3.0, gt=0, description="KD temperature T")
    alpha: float = Field(0.7, ge=0, description="weight of the KD term added to the detection loss")
    teacher_model: str = Field(
        "yolo11s.yaml", description="feature/both: the larger detector, a yaml (trained here first) or a checkpoint"
    )
    teacher_epochs: int = Field(10, ge=1, description="feature/both: epochs for the larger detector when trained here")
    dis: float = Field(6.0, ge=0, description="feature/both: ultralytics' feature-distillation loss weight")
    # a fine-tune of the baseline: fewer epochs, a gentler start
    epochs: int = Field(4, ge=1)
    lr0: float | None = Field(0.001, gt=0)
    warmup_epochs: float | None = Field(0.5, ge=0)
    close_mosaic: int = Field(1, ge=0)


class QualityParams(_Section):
    """The quality gate: every threshold of its great-expectations suites, the dedup, the drift check and the splits.

    Nothing trains on labels this stage has not passed; a failed expectation stops the run with the observed value
    and the threshold named here.
    """

    # -- what enters the dataset
    include_needs_review: bool = Field(
        False, description="auto boxes the autolabel stage flagged needs_review: left out (and counted) unless true"
    )
    keep_auto_background: bool = Field(
        False,
        description="auto-labeled images where no box passed: left out (the labeler was unsure, not sure of "
        "'nothing here') unless true",
    )
    min_auto_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="auto boxes below this confidence are left out (painted out when low_confidence is an ignore "
        "reason). 0 here keeps whatever autolabel.review_threshold passed; the project's params.yaml sets 0.5 "
        "(measured)",
    )
    min_proposer_conf: float = Field(
        0.0,
        ge=0,
        le=1,
        description="auto boxes the proposer found less sure than this are left out (its box may be "
        "loose even when the teachers agree on the name)",
    )
    min_other_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="auto boxes the teachers call 'other' less sure than this are left out as 'unsure_other' (painted "
        "out when that is an ignore reason) instead of staying in the picture as background; 0: every 'other' stays",
    )
    ignore_reasons: list[
        Literal["needs_review", "low_confidence", "low_proposer_conf", "unsure_other", "other", "duplicate"]
    ] = Field(
        default_factory=lambda: ["needs_review", "low_confidence", "low_proposer_conf", "unsure_other"],
        description="auto boxes left out for these reasons are painted grey in the dataset's copy of their image "
        "(an ignore region: an unsure object must not be taught as background); [] keeps the images as they are",
    )
    nms_iou: float = Field(
        0.7, gt=0, le=1, description="class-aware NMS on auto boxes: same-class boxes overlapping more are duplicates"
    )
    # -- expectations on the labels and images
    box_tolerance_px: float = Field(1.0, ge=0, description="how far (pixels) a box may reach outside its image")
    min_box_side: float = Field(1.0, ge=0, description="a box narrower or lower than this (pixels) fails")
    topk_sum_tolerance: float = Field(1e-3, ge=0, description="a box's top-k probabilities may sum to 1 + this")
    min_boxes_per_image: int = Field(0, ge=0)
    max_boxes_per_image: int = Field(100, ge=1)
    max_background_share: float = Field(
        0.3, ge=0, le=1, description="share of dataset images without any box (auto-labeled ones: a proposer miss)"
    )
    min_image_side: int = Field(32, ge=1, description="pixels, either side")
    max_image_side: int = Field(8192, ge=1, description="pixels, either side")
    min_classes: int = Field(1, ge=0, description="ontology classes with at least one box in the dataset")
    min_images_per_class: int = Field(10, ge=0, description="training images per class present in the dataset")
    max_class_imbalance: float = Field(
        50.0, ge=1, description="boxes of the most frequent class / boxes of the least frequent present class"
    )
    min_split_images: dict[str, int] = Field(
        default_factory=lambda: {"train": 1, "val": 1, "test": 0},
        description="images each split needs at least (ultralytics cannot train without val)",
    )
    near_dup_distance: int = Field(
        4, ge=0, le=64, description="perceptual-hash Hamming distance at which two images count as the same scene"
    )
    # -- splits
    split_ratios: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2},
        description="by image hash; gold images are the test set, so then non-gold images split train:val only",
    )
    # -- label issues (cleanlab)
    review_worst: int = Field(50, ge=0, description="the worst-scored boxes sent to the review queue")
    label_issue_threshold: float = Field(0.5, ge=0, le=1, description="box label-quality score counted as an issue")
    label_issue_min_prob: float = Field(
        0.8, gt=0, le=1, description="another class predicted this probably on a labeled spot makes the label suspect"
    )
    champion: Path | None = Field(
        None, description="a detector checkpoint whose out-of-sample predictions also score the labels (optional)"
    )
    # -- drift against the last accepted dataset
    drift_max_psi: float = Field(0.25, gt=0, description="population stability index above which a feature drifted")
    drift_bins: int = Field(10, ge=2, description="quantile bins of the reference for continuous features")
    workers: int = Field(4, ge=1, description="threads reading image statistics")

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "val", "test"}:
            raise ValueError(f"needs exactly the keys train, val, test (got {sorted(v)})")
        if any(x < 0 for x in v.values()) or v["train"] <= 0 or v["val"] <= 0:
            raise ValueError(f"ratios must be ≥ 0 with train and val > 0 (got {v})")
        return v

    @field_validator("min_split_images")
    @classmethod
    def _split_keys(cls, v: dict[str, int]) -> dict[str, int]:
        bad = set(v) - {"train", "val", "test"}
        if bad or any(x < 0 for x in v.values()):
            raise ValueError(f"keys must be train/val/test with counts ≥ 0 (got {v})")
        return {"train": 0, "val": 0, "test": 0, **v}


class OrchestrationParams(_Section):
    """Where the stages run: in this process (``local``), or the GPU stages as deployments on a work pool (``pools``).

    ``pools`` needs a Prefect server with the deployments of prefect.yaml (``prefect deploy --all``) and a worker
    on ``gpu_pool``; see infra/README.md. The labeling fan-out runs on threads, or on a Dask cluster (prefect-dask)
    at ``dask_address`` (a temporary local cluster when it is empty).
    """

    dispatch: Literal["local", "pools"] = "local"
    cpu_pool: str = "cpu"
    gpu_pool: str = "gpu"
    gpu_stages: list[str] = Field(
        default_factory=lambda: ["autolabel", "train", "distill", "export"],
        description="stages that run as deployments `stage/<name>` on gpu_pool when dispatch is pools",
    )
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, description="tcp://scheduler:8786; empty: a temporary local cluster")

    @field_validator("gpu_stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: choose from {list(STAGES)}")
        return v


class ServeParams(_Section):
    """`wanwu serve`: the model it serves, micro-batching, request limits, hot reload and the optional cascade.

    The API token is infrastructure: it comes from the environment variable named by ``token_env``, never from here.
    """

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 to listen on every interface")
    port: int = Field(8000, ge=0, le=65535)
    model: str = Field("", description="an .onnx file to serve; empty: the registry's `alias` of `registry_model`")
    registry_model: str = "wanwu-detector"
    alias: str = "champion"
    reload_interval: float = Field(10.0, gt=0, description="seconds between checks for a moved alias or a new file")
    conf: float = Field(0.25, ge=0, le=1, description="box confidence threshold")
    iou: float = Field(0.7, gt=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(300, ge=1)
    imgsz: int | None = Field(None, ge=32, description="inference size; null: the size the ONNX was exported at")
    max_batch: int = Field(
        4,
        ge=1,
        description="images per onnxruntime call at most; small enough that every inference thread gets a batch "
        "while the next one gathers (see wanwu.serve)",
    )
    batch_window_ms: float = Field(4.0, ge=0, description="how long the first request of a batch waits for others")
    max_queue: int = Field(256, ge=1, description="requests waiting for a batch; beyond it: 503, retry later")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0: one per core")
    reduced_decode: bool = Field(
        True,
        description="decode a JPEG at least twice the model's input size at 1/2, 1/4 or 1/8 (libjpeg's DCT scaling: "
        "a third of the decode time, an area-averaged downscale); off: full decode, then the letterbox resize",
    )
    max_image_bytes: int = Field(10_000_000, gt=0, description="per uploaded image (413 above)")
    max_request_bytes: int = Field(40_000_000, gt=0, description="whole request body (413 above)")
    max_images: int = Field(16, ge=1, description="images per request (413 above)")
    max_pixels: int = Field(40_000_000, gt=0, description="width × height per image, a decompression-bomb guard (413)")
    content_types: list[str] = Field(
        default_factory=lambda: ["image/jpeg", "image/png", "image/webp", "image/bmp", "application/octet-stream"],
        description="accepted part types (415 otherwise); octet-stream parts are accepted when they decode",
    )
    token_env: str = Field("WANWU_API_TOKEN", description="env var holding the bearer token; unset: no token needed")
    cascade: bool = Field(False, description="re-name low-confidence boxes with the teacher on their crops")
    cascade_threshold: float = Field(0.5, ge=0, le=1, description="boxes below this confidence go to the teacher")
    cascade_cache: int = Field(4096, ge=0, description="teacher answers kept, by crop content hash (LRU)")
    cascade_context: float | None = Field(
        None, ge=1, description="square crop side = this × the box's longer side; null: the teacher's own context"
    )
    cascade_teacher: str = Field(
        "", description="`module:factory` returning an object with predict_proba(crops) → probs over ontology ids"
    )


class EvaluateParams(_Section):
    """Every candidate and the current champion on the same gold set (the quality dataset's test split)."""

    candidates: list[str] = Field(
        default_factory=lambda: ["train/best.pt", "distill/best.pt"],
        description="checkpoints relative to project.data_dir; missing ones are skipped (distill is optional)",
    )
    include_champion: bool = Field(True, description="also measure the registry's champion on the same gold set")
    split: str = Field("test", description="the gold split of data/quality/dataset/data.yaml")
    imgsz: int | None = Field(
        None, ge=32, description="null: the first candidate's training imgsz × imgsz_scale, for every model"
    )
    imgsz_scale: float = Field(
        1.125,
        gt=0,
        description="with imgsz null: inference at the training size × this, to a multiple of 32 (mosaic and scale "
        "augmentation show the student its objects larger than a plain resize does; FixRes, Touvron et al. 2019)",
    )
    batch: int = Field(16, ge=1)
    conf: float = Field(0.001, ge=0, le=1, description="ultralytics' validation default: mAP needs the low scores")
    iou: float = Field(0.7, gt=0, le=1)
    latency_runs: int = Field(30, ge=2, description="timed CPU predict calls, batch 1, for p50 and p95")
    latency_warmup: int = Field(5, ge=0)
    plots: bool = Field(True, description="confusion matrices and PR curves with Chinese names")


class ExportParams(_Section):
    """ONNX export (ultralytics' names), the parity check against PyTorch and the INT8 decision."""

    imgsz: int | None = Field(None, ge=32, description="null: the image size the evaluation used")
    dynamic: bool = Field(True, description="dynamic batch (and spatial) axes")
    simplify: bool = Field(True, description="onnxslim")
    opset: int | None = Field(18, ge=9, description="null: ultralytics picks the newest its torch supports")
    parity_images: int = Field(8, ge=1, description="gold images run through both PyTorch and onnxruntime")
    parity_max_abs_diff: float = Field(0.01, gt=0, description="largest raw output difference (pixels / scores)")
    parity_conf: float = Field(0.25, ge=0, le=1, description="confidence filter before NMS for box agreement")
    parity_iou: float = Field(0.7, gt=0, le=1, description="NMS IoU")
    parity_box_iou: float = Field(0.9, gt=0, le=1, description="IoU at which two boxes of one class agree")
    parity_min_agreement: float = Field(0.95, ge=0, le=1, description="matched boxes / boxes")
    int8: bool = Field(True, description="try INT8 static quantization (kept only when it pays)")
    int8_calibration_images: int = Field(64, ge=1, description="training images that calibrate the INT8 ranges")
    int8_per_channel: bool = False
    int8_max_map_drop: float = Field(0.01, ge=0, description="mAP50-95 INT8 may lose (0.01 = 1 point)")
    int8_min_speedup: float = Field(1.05, gt=0, description="FP32 p50 / INT8 p50 needed to keep INT8")
    latency_runs: int = Field(50, ge=2)
    latency_warmup: int = Field(5, ge=0)
    conf: float = Field(0.25, ge=0, le=1, description="the served model's default confidence threshold")
    iou: float = Field(0.7, gt=0, le=1, description="the served model's default NMS IoU")
    log_model: bool = Field(True, description="log the model to MLflow and register it as a version")


class PromoteParams(_Section):
    """The promotion gate, the canary and the rollback tolerance (the model name comes from the environment)."""

    min_improvement: float = Field(0.005, ge=0, description="mAP50-95 the candidate must gain over the champion")
    max_recall_drop: float = Field(0.10, ge=0, le=1, description="largest recall any class may lose")
    latency_budget_ms: float = Field(250.0, gt=0, description="p95 CPU latency (batch 1) a candidate must stay under")
    floor_map50: float = Field(0.10, ge=0, le=1, description="absolute floor, for the first model and every model")
    floor_map50_95: float = Field(0.05, ge=0, le=1)
    rollback_tolerance: float = Field(
        0.05, ge=0, le=1, description="roll back when accuracy < (1 − this) × the figure at promotion"
    )
    rollback_metric: Literal["mAP50-95", "mAP50"] = "mAP50-95"
    canary: bool = Field(True, description="re-evaluate the new champion from the registry right after promotion")
    lock_timeout_s: float = Field(600.0, gt=0, description="how long a promotion waits for another one to finish")


class ProposerTrainParams(_UltralyticsArgs):
    """The proposer trained here when there is no detector to start from (``autolabel.proposer`` auto or a yaml):
    generic-corpus boxes (class 物体) plus the human seed (ontology classes), ultralytics' own argument names.
    Sized for minutes on a CPU (every batch an optimizer step, no warm-up: ultralytics' warm-up lasts at least
    100 iterations, a third of this run)."""

    model: str = Field("yolo11n.yaml", description="the architecture to train when autolabel.proposer is auto")
    epochs: int = Field(16, ge=1)
    imgsz: int = Field(256, ge=32)
    warmup_epochs: float | None = Field(0.0, ge=0)
    close_mosaic: int = Field(1, ge=0)
    generic_train: int | None = Field(200, ge=0, description="generic-corpus training images used (null: all)")
    generic_val: int = Field(40, ge=0, description="generic-corpus validation images")
    seed_repeat: int = Field(2, ge=1, description="each seed image appears this often per epoch (the seed is small)")


class ExpertTrainParams(_UltralyticsArgs):
    """The sample world's default teacher: one ultralytics classifier per catalogue domain (plus ``other``),
    its backbone started from the proposer's (pretrained on the generic corpus)."""

    model: str = Field("yolo11n-cls.yaml", description="classifier architecture (yaml) or checkpoint")
    epochs: int = Field(20, ge=1)
    imgsz: int = Field(64, ge=16)
    batch: int | float = 16
    nbs: int | None = Field(16, ge=1)
    warmup_epochs: float | None = Field(0.0, ge=0)
    close_mosaic: int = 0
    mosaic: float = 0.0
    erasing: float = Field(0.0, ge=0, le=1, description="random erasing (ultralytics: 0.4)")
    auto_augment: str | None = Field(None, description="randaugment / autoaugment / augmix (ultralytics: randaugment)")
    init_from_proposer: bool = Field(True, description="start each expert's backbone from the proposer's weights")
    other_from_domains: int = Field(10, ge=0, description="per other domain: catalogue images an expert sees as other")
    generic_other: int = Field(40, ge=0, description="generic-corpus object crops every expert sees as other")
    single_baseline: bool = Field(True, description="also train one all-domain classifier (fusion table baseline)")
    seed_crops: float = Field(
        0.0,
        ge=0,
        le=0.9,
        description="share of the human-labeled seed images (by content hash) whose crops also train the experts: "
        "each human box under its class, each proposer box that matches no human box as other (the scenes' own "
        "distractors, which catalogue images never show). The other seed images fit the fusion and its "
        "calibration, unseen by the experts. 0: catalogue only",
    )

    def ultralytics_args(self, project_seed: int = 0) -> dict[str, Any]:
        own = {"erasing": self.erasing, "auto_augment": self.auto_augment}
        return {**super().ultralytics_args(project_seed), **own, **self.extra}


class TeacherSpec(_Section):
    """One recognizer. ``kind``: ultralytics (a ``*-cls.pt``), torchvision / timm (state_dict + ``arch`` +
    ``labels``), modelscope (a general-recognition model folder), open_clip (``arch`` = model name with ``path`` =
    weights file, or ``path`` = an open_clip folder). Paths are relative to the project folder."""

    kind: Literal["ultralytics", "torchvision", "timm", "modelscope", "open_clip"]
    path: str
    name: str | None = None
    arch: str | None = None
    labels: str | None = Field(None, description="torchvision/timm: a labels file (one per line or a JSON list)")
    config: str | None = Field(None, description="open_clip: a model config JSON to register first")
    imgsz: int | None = Field(None, ge=16)
    batch: int = Field(256, ge=1, description="crops per forward pass")


class FusionParams(_Section):
    strategy: Literal["vote", "weighted", "product", "stacked"] = Field(
        "weighted", description="how the teachers' opinions combine (the fusion table in metrics.json compares all)"
    )
    weights: dict[str, float] = Field(default_factory=dict, description="weighted, product: teacher name → weight")
    fit_weights: bool = Field(True, description="weighted, product: weights = each teacher's accuracy on labeled crops")
    C: float = Field(1.0, gt=0, description="stacked: inverse regularisation of the logistic regression")
    other_crops: int = Field(200, ge=0, description="generic-corpus crops added to the seed crops as 'other' examples")
    calibrate: bool = Field(
        True,
        description="fit one temperature on the labeled crops so the fused top probability is calibrated: the "
        "review and confidence thresholds then mean the same under every strategy (the fusion table shows the "
        "calibration error on the gold crops before and after)",
    )
    include_single: bool = Field(
        True,
        description="the all-domain classifier (experts.single_baseline) joins the fused teachers: the experts "
        "reject distractors better, it names real objects better, the stack learns when to trust which",
    )


class AutolabelParams(_Section):
    """Proposer boxes → crops → teachers → fusion → merged labels, review queue and soft labels."""

    proposer: str = Field(
        "auto",
        description="a detector checkpoint (.pt), a model yaml (trained here), champion (the registry's alias) or "
        "auto (the champion if there is one, else one trained here on the generic corpus plus the seed)",
    )
    class_aware: bool = Field(True, description="use the proposer's class names (looked up in the ontology)")
    conf: float = Field(0.05, ge=0, le=1, description="proposer confidence threshold (low: recall first)")
    iou: float = Field(0.6, gt=0, le=1, description="class-agnostic NMS IoU")
    max_det: int = Field(100, ge=1)
    imgsz: int | None = Field(None, ge=32, description="proposer inference size; null: its training size")
    augment: bool = Field(
        False,
        description="ultralytics' test-time augmentation for the proposer (flips, scales 1/0.83/0.67): more "
        "objects found, 1.7× the proposer's time at the same size (measured) and more boxes for the teachers",
    )
    proposer_train: ProposerTrainParams = ProposerTrainParams()
    teachers: list[TeacherSpec] = Field(
        default_factory=list, description="empty: domain experts trained on data/world/catalogue (sample world)"
    )
    experts: ExpertTrainParams = ExpertTrainParams()
    fusion: FusionParams = FusionParams()
    topk: int = Field(5, ge=1, description="soft labels kept per box (the distill stage reads them)")
    crop_context: float = Field(1.0, ge=1, description="square crop side = this × the box's longer side")
    teacher_threshold: float = Field(0.5, ge=0, le=1, description="teacher's label wins over the proposer's above")
    review_threshold: float = Field(
        0.5, ge=0, le=1, description="boxes whose (calibrated, fusion.calibrate) top probability is below need review"
    )
    review_max_tasks: int = Field(300, ge=0, description="images in the Label Studio queue, most uncertain first")
    review_image_root: str = Field("/data/local-files/?d=", description="prefix of data/-relative image paths")
    review_imports: list[str] = Field(
        default_factory=list, description="Label Studio JSON exports (files or globs): their answers beat auto labels"
    )
    splits: list[Literal["pool", "gold", "seed"]] = Field(
        default_factory=lambda: ["pool", "gold"], description="manifest splits to label"
    )
    shard_size: int = Field(64, ge=1, description="images per shard (one Parquet part, one Prefect task)")
    proposer_batch: int = Field(16, ge=1, description="images per proposer forward pass")
    crop_batch: int = Field(256, ge=1, description="crops per teacher forward pass (experts)")
    runner: Literal["threads", "dask", "local"] | None = Field(
        None,
        description="shard fan-out: Prefect tasks on threads, Prefect tasks on Dask (prefect-dask), or a plain loop; "
        "null: orchestration.task_runner (threads by default)",
    )
    workers: int = Field(2, ge=1, description="threads, or local Dask workers")
    dask_address: str | None = Field(
        None, description="tcp://scheduler:8786; null: orchestration.dask_address, else a temporary local cluster"
    )
    match_iou: float = Field(0.5, gt=0, le=1, description="IoU for precision/recall against the truth")


class StageParams(_Section):
    """A later stage's section: accepted as it is until that stage defines its record."""

    model_config = ConfigDict(extra="allow")


class Params(_Section):
    project: ProjectParams = ProjectParams()
    collect: CollectParams = CollectParams()
    autolabel: AutolabelParams = AutolabelParams()
    quality: QualityParams = QualityParams()
    train: TrainParams = TrainParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()
    serve: ServeParams = ServeParams()
    orchestration: OrchestrationParams = OrchestrationParams()

    # ---- paths every stage agrees on -----------------------------------------------------------------
    def resolve(self, root: Path) -> Params:
        """Make relative paths absolute against the project root (the folder of params.yaml)."""
        p = self.model_copy(deep=True)
        if not p.project.data_dir.is_absolute():
            p.project.data_dir = root / p.project.data_dir
        if not p.project.ontology.is_absolute():
            p.project.ontology = root / p.project.ontology
        p.collect = p.collect.resolve(root)
        return p


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid value(s); fix each key below in this file:"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (misspelt?). Remove it or check the section's keys in README.")
        else:
            lines.append(f"  - {key} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Parse params.yaml (plus dotted-key overrides such as ``{"train.epochs": 3}``) into typed records."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found. Run from the project folder or pass --params.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e}). Fix the syntax at the line shown.") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of stage sections, got {type(raw).__name__}.")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_error(path, e)) from None
    return params.resolve(path.parent)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def project_root() -> Path:
    """The folder holding params.yaml: $WANWU_ROOT, else the current directory."""
    return Path(os.environ.get("WANWU_ROOT", ".")).resolve()
