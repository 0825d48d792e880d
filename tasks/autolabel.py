"""autolabel stage: proposer boxes → crops → teachers → fusion → merged labels, soft labels and a review queue.

Reads ``collect/manifest.parquet`` (labels the ``autolabel.splits`` images, pool and gold by default),
``collect/human_labels.parquet`` (the seed trains the proposer and the stacked fusion), ``world/catalogue`` and
``world/generic`` (the sample world's expert catalogue and generic detection corpus) and, only to measure,
``collect/truth.parquet``. Writes under ``data/autolabel/``:

* ``labels.parquet`` — contract ``labels``: one row per box, origin auto (human where a review was imported),
  ``topk_ids``/``topk_probs`` = fused teacher top-k over ontology ids (−1 other), merged ``label_id``,
  ``confidence``, ``needs_review``;
* ``review/tasks.json`` + ``review/config.xml`` — the Label Studio queue (import JSON and labeling config);
* ``proposer/best.pt`` — the proposer (class-aware: ontology ids 0..K-1 plus 物体), the student's start;
* ``teachers/<domain>/best.pt``, ``teachers/_all/best.pt``, ``teachers/fusion.json``; ``teacher.json`` (the
  fused teacher for ``serve.cascade_teacher: wanwu.models.teachers:from_params``);
* ``parts/<proposer version>-<teacher version>/*.parquet`` — the content-addressed labeling cache;
* ``metrics.json`` — precision/recall vs the truth (overall, per class), the fusion table, the run's counts.

Everything trained here is cached by a fingerprint of its inputs, and labeling by content hash: a re-run with
unchanged inputs trains nothing and calls no model. ``run`` is plain Python; the shards fan out as Prefect tasks
on threads or a Dask cluster (``autolabel.runner``), or run in a plain loop (``local``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from tasks import lazy_task
from wanwu import contracts, labeling
from wanwu.config import AutolabelParams, Params, ProjectParams, usable_cores
from wanwu.labeling import FusionSpec, LabelerSpec, ProposerSpec, Reviewed, Shard, ShardResult
from wanwu.models import fusion as fz
from wanwu.models import proposer as pz
from wanwu.models import teachers as tz
from wanwu.ontology import OTHER_ID, Ontology

log = logging.getLogger(__name__)


class AutolabelError(RuntimeError):
    """The stage cannot run; the message names the input and the fix."""


class AutolabelResult(BaseModel):
    labels: str
    review_tasks: str
    metrics: str
    proposer: str
    proposer_source: str
    teachers: list[str]
    images: int
    cached_images: int
    labeled_images: int
    boxes: int
    needs_review: int
    review_tasks_count: int
    model_calls: int
    labeling_seconds: float
    seconds: float
    precision: float | None = None
    recall: float | None = None
    fusion_strategy: str = ""


# ---- small helpers -----------------------------------------------------------------------------------------


def _listing_hash(folder: Path, pattern: str = "**/*") -> str:
    """Hash of the relative names and sizes of the files under a folder: cheap, catches added/changed files."""
    h = hashlib.sha256()
    if folder.is_dir():
        for f in sorted(folder.glob(pattern)):
            if f.is_file():
                h.update(f"{f.relative_to(folder)}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _frame_hash(df: pd.DataFrame) -> str:
    """Hash of a frame's columns and rows. Not via ``str()``: numpy prints arrays (the top-k columns) by global print
    options, and ultralytics changes them on import, so a run that trained the proposer first hashed the same seed
    boxes differently from the next run and retrained every expert (and refitted the fusion) for nothing."""
    rows = df.to_dict("split")["data"]
    text = json.dumps([list(map(str, df.columns)), rows], default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(v: Any) -> Any:
    """numpy arrays and scalars as Python values; anything else json cannot write (pd.NA, timestamps) as its text."""
    return v.tolist() if isinstance(v, np.ndarray | np.generic) else str(v)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _child_run(name: str) -> Iterator[None]:
    """A nested MLflow run for a training inside the stage, so ultralytics' callback logs there, not over ours."""
    try:
        import mlflow
    except ImportError:
        yield
        return
    if mlflow.active_run() is None:
        yield
        return
    with mlflow.start_run(run_name=name, nested=True):
        yield


def _resolve(root: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else root / p


# ---- inputs ------------------------------------------------------------------------------------------------


class Inputs:
    """The collect stage's tables, read once."""

    def __init__(self, data_dir: Path):
        c = data_dir / "collect"
        self.data_dir = data_dir
        self.manifest = contracts.read("manifest", c / "manifest.parquet")
        hl = c / "human_labels.parquet"
        self.human = contracts.read("labels", hl) if hl.is_file() else contracts.empty("labels")
        tp = c / "truth.parquet"
        self.truth = contracts.read("labels", tp) if tp.is_file() else None
        self.world = data_dir / "world"

    def seed_boxes(self) -> list[tuple[Path, int, int, list[tuple[int, float, float, float, float]]]]:
        seed = self.manifest[self.manifest["split"] == "seed"]
        by_sha = {s: g for s, g in self.human.groupby("sha256")}
        out = []
        for r in seed.itertuples():
            g = by_sha.get(r.sha256)
            boxes = (
                []
                if g is None
                else [(int(b.label_id), float(b.x1), float(b.y1), float(b.x2), float(b.y2)) for b in g.itertuples()]
            )
            out.append((self.data_dir / r.path, int(r.width), int(r.height), boxes))
        return out


# ---- proposer ----------------------------------------------------------------------------------------------


def prepare_proposer(
    params: AutolabelParams, project: ProjectParams, ontology: Ontology, inputs: Inputs
) -> tuple[Path, str]:
    """(checkpoint, where it came from): a given .pt, the registry champion, or one trained here (cached)."""
    root = project.data_dir.parent
    out = project.data_dir / "autolabel" / "proposer"
    choice = params.proposer.strip()
    if choice.endswith(".pt"):
        path = _resolve(root, choice)
        if not path.is_file():
            raise AutolabelError(
                f"autolabel.proposer = {choice!r}: {path} does not exist. Give an existing detector checkpoint."
            )
        return path, f"checkpoint {path}"
    if choice == "champion":
        champ = pz.champion_checkpoint(root, out / "champion")
        if champ is None:
            raise AutolabelError(
                "autolabel.proposer = champion but the registry has no wanwu-detector@champion with a .pt file. "
                "Run the pipeline once (it registers a champion) or set autolabel.proposer to auto or a checkpoint."
            )
        return champ, "registry champion"
    if choice == "auto":
        # Not the champion: labels must be a function of the stage's declared inputs, or neither `dvc repro` nor
        # the flow's cache can tell a re-run from a change (the registry lives outside both).
        model = params.proposer_train.model
    elif choice.endswith((".yaml", ".yml")):
        model = choice
    else:
        raise AutolabelError(
            f"autolabel.proposer = {choice!r}: give a .pt checkpoint, a model .yaml, champion or auto."
        )
    return train_or_reuse_proposer(params, project, ontology, inputs, model), f"trained here from {model}"


def train_or_reuse_proposer(
    params: AutolabelParams, project: ProjectParams, ontology: Ontology, inputs: Inputs, model: str
) -> Path:
    out = project.data_dir / "autolabel" / "proposer"
    generic_yaml = inputs.world / "generic" / "data.yaml"
    generic = generic_yaml if generic_yaml.is_file() else None
    seed = inputs.seed_boxes()
    t = params.proposer_train
    args = t.ultralytics_args(project.seed)
    for k in ("generic_train", "generic_val", "seed_repeat", "model"):
        args.pop(k, None)
    fp = pz.fingerprint(
        model,
        args,
        params.class_aware,
        t.generic_train,
        t.generic_val,
        t.seed_repeat,
        _listing_hash(inputs.world / "generic"),
        [(str(p.name), b) for p, _, _, b in seed],
        [c.zh for c in ontology.classes],
    )
    best, stamp = out / "best.pt", out / "fingerprint.json"
    if best.is_file() and (_read_json(stamp) or {}).get("fingerprint") == fp:
        return best
    log.info("training the proposer (%s) on the generic corpus + %d seed images", model, len(seed))
    data_yaml = pz.build_dataset(
        generic,
        seed,
        out / "data",
        ontology,
        generic_train=t.generic_train,
        generic_val=t.generic_val,
        seed_repeat=t.seed_repeat,
        class_aware=params.class_aware,
    )
    t0 = time.perf_counter()
    with _child_run("autolabel/proposer"):
        pz.train_proposer(data_yaml, out, model=_model_arg(project, model), device=project.device, **args)
    _write_json(stamp, {"fingerprint": fp, "model": model, "seconds": round(time.perf_counter() - t0, 1)})
    return best


def _model_arg(project: ProjectParams, model: str) -> str:
    p = _resolve(project.data_dir.parent, model)
    return str(p) if p.is_file() else model  # a bare yaml name is one of ultralytics' own


# ---- teachers ----------------------------------------------------------------------------------------------


def prepare_teachers(
    params: AutolabelParams, project: ProjectParams, ontology: Ontology, inputs: Inputs, proposer: Path
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(teacher specs, the single all-domain baseline spec or None)."""
    root = project.data_dir.parent
    if params.teachers:
        specs = []
        for t in params.teachers:
            d = t.model_dump()
            d["path"] = str(_resolve(root, t.path))
            for key in ("labels", "config"):
                if d.get(key):
                    d[key] = str(_resolve(root, d[key]))
            d["name"] = t.name or Path(t.path).stem
            specs.append(d)
        return specs, None
    catalogue = inputs.world / "catalogue"
    if not catalogue.is_dir():
        raise AutolabelError(
            f"{catalogue}: no expert catalogue and no autolabel.teachers. Collect a sample:// source (it writes the "
            "catalogue) or list your recognizers under autolabel.teachers."
        )
    paths = train_or_reuse_experts(params, project, ontology, inputs, proposer)
    spec = lambda name, p: {"kind": "ultralytics", "path": str(p), "name": name, "batch": params.crop_batch}  # noqa: E731
    experts = [spec(name, p) for name, p in paths.items() if name != "_all"]
    single = spec("_all", paths["_all"]) if "_all" in paths else None
    return experts, single


def train_or_reuse_experts(
    params: AutolabelParams, project: ProjectParams, ontology: Ontology, inputs: Inputs, proposer: Path
) -> dict[str, Path]:
    e = params.experts
    out = project.data_dir / "autolabel" / "teachers"
    catalogue = inputs.world / "catalogue"
    # The experts' backbone starts from the proposer trained here on the generic corpus when there is one, not from
    # whichever detector proposes today: a new champion must not retrain every expert.
    local = project.data_dir / "autolabel" / "proposer" / "best.pt"
    init = (local if local.is_file() else proposer) if e.init_from_proposer else None
    args = e.ultralytics_args(project.seed)
    for k in ("model", "init_from_proposer", "other_from_domains", "generic_other", "single_baseline"):
        args.pop(k, None)
    fit_seed = seed_for_experts(inputs, e.seed_crops)
    # the scene crops: which seed boxes, and the proposer (its unmatched boxes are the "other" crops); nothing when
    # off, so experts trained before the option existed stay cached
    scene = [e.seed_crops, _frame_hash(fit_seed), pz.file_sha256(proposer)] if e.seed_crops else []
    if scene:
        scene.append(proposer_spec(params, proposer).model_dump(exclude={"weights", "batch_size"}))
    fp = pz.fingerprint(
        e.model,
        args,
        e.other_from_domains,
        e.generic_other,
        e.single_baseline,
        params.crop_context,
        _listing_hash(catalogue),
        _listing_hash(inputs.world / "generic"),
        pz.file_sha256(init) if init else None,
        *scene,
    )
    stamp = out / "experts.json"
    prev = _read_json(stamp) or {}
    if prev.get("fingerprint") == fp and all(Path(p).is_file() for p in prev.get("paths", {}).values()):
        return {k: Path(v) for k, v in prev["paths"].items()}
    generic_yaml = inputs.world / "generic" / "data.yaml"
    other: dict[str, list[Path]] = {}
    if generic_yaml.is_file() and e.generic_other:
        other = tz.generic_crops(
            generic_yaml,
            out / "generic_crops",
            {"train": e.generic_other, "val": max(1, e.generic_other // 4)},
            size=max(e.imgsz, 64),
            context=params.crop_context,
            seed=project.seed,
        )
    in_domain, scene_counts = (
        scene_crops(params, project, ontology, inputs, proposer, fit_seed, out / "scene_crops", size=max(e.imgsz, 64))
        if e.seed_crops
        else ({}, {})
    )
    datasets = tz.build_expert_datasets(
        catalogue,
        out / "data",
        other,
        other_from_domains=e.other_from_domains,
        seed=project.seed,
        single=e.single_baseline,
        in_domain=in_domain,
        ontology=ontology,
        batch=e.batch if isinstance(e.batch, int) and e.batch > 1 else None,
    )
    n_imgs = {d: len(list((p / "train").glob("*/*"))) for d, p in datasets.items()}
    expert_total = sum(v for d, v in n_imgs.items() if d != "_all")
    paths: dict[str, Path] = {}
    top1: dict[str, float | None] = {}
    t0 = time.perf_counter()
    for domain, data_dir in datasets.items():
        run_args = dict(args)
        if domain == "_all":  # the same budget as all experts together: as many image-passes
            run_args["epochs"] = max(1, round(e.epochs * expert_total / max(1, n_imgs[domain])))
        log.info("training expert %s (%d images, %d epochs)", domain, n_imgs[domain], run_args["epochs"])
        with _child_run(f"autolabel/expert/{domain}"):
            fitted = tz.train_classifier(
                data_dir,
                out / domain,
                model=_model_arg(project, e.model),
                init=init,
                device=project.device,
                progress=f"expert {domain}",
                **run_args,
            )
        paths[domain] = fitted.best
        acc = fitted.metrics.get("metrics/accuracy_top1")  # best.pt on the val split
        top1[domain] = None if acc is None else round(acc, 4)
        warning = _chance_warning(domain, top1[domain], len([p for p in (data_dir / "val").iterdir() if p.is_dir()]))
        if warning:
            log.warning(warning)
    _write_json(
        stamp,
        {
            "fingerprint": fp,
            "paths": {k: str(v) for k, v in paths.items()},
            "val_top1": top1,
            "images": n_imgs,
            "scene_crops": scene_counts,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return paths


def seed_for_experts(inputs: Inputs, share: float) -> pd.DataFrame:
    """The human boxes of the seed images whose crops train the experts: a fixed ``share`` of the seed chosen by
    content hash (an image keeps its side when others are added). The rest fit the fusion (:func:`fusion_seed`)."""
    seed = inputs.manifest.loc[inputs.manifest["split"] == "seed", "sha256"]
    # salted: the quality stage splits train / val on the bare content hash, and this must not follow it
    chosen = {s for s in seed if int(hashlib.sha256(f"experts:{s}".encode()).hexdigest()[:13], 16) < share * 16**13}
    return inputs.human[inputs.human["sha256"].isin(chosen)]


def fusion_seed(params: AutolabelParams, inputs: Inputs) -> pd.DataFrame:
    """The seed's human boxes the fusion is fitted and calibrated on: those the experts trained here never saw."""
    seed = inputs.manifest.loc[inputs.manifest["split"] == "seed", "sha256"]
    boxes = inputs.human[inputs.human["sha256"].isin(seed)]
    if params.teachers or not params.experts.seed_crops:
        return boxes
    held_out = boxes[~boxes["sha256"].isin(seed_for_experts(inputs, params.experts.seed_crops)["sha256"])]
    if not (held_out["label_id"] >= 0).any() and (boxes["label_id"] >= 0).any():
        raise AutolabelError(
            f"autolabel.experts.seed_crops = {params.experts.seed_crops:g} leaves the fusion no object box to be "
            f"fitted on ({boxes['sha256'].nunique()} seed images with boxes, {held_out['sha256'].nunique()} held out "
            "from the experts). Lower autolabel.experts.seed_crops (0: off) or label more seed images."
        )
    return held_out


def scene_crops(
    params: AutolabelParams,
    project: ProjectParams,
    ontology: Ontology,
    inputs: Inputs,
    proposer: Path,
    boxes: pd.DataFrame,
    out_dir: Path,
    size: int,
    unmatched_iou: float = 0.3,
) -> tuple[dict[int, list[Path]], dict[str, int]]:
    """Crops cut from the seed images in ``boxes`` for the experts: each human box under its ontology id, and
    each box the proposer finds there that overlaps no human box (IoU < ``unmatched_iou``) under ``OTHER_ID``: a
    human labeled every ontology object on a seed image, so what else the proposer boxes is not one of them.

    The catalogue shows objects alone; these are the scenes' own clutter, scale and distractors (on the CPU-hour
    world the all-domain classifier named 13 % of the gold scenes' distractors "other" from the catalogue alone,
    62 % with these crops). PNGs at ``size`` px under ``out_dir``, rebuilt each time the experts are.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out: dict[int, list[Path]] = {}
    if boxes.empty:
        return out, {"images": 0, "objects": 0, "other": 0}
    ps = proposer_spec(params, proposer)
    prop = pz.Proposer(ps.weights, ontology, device=project.device, **ps.model_dump(exclude={"weights"}))
    paths = inputs.manifest.set_index("sha256")["path"]

    def save(im: Any, box: Any, cid: int, name: str) -> None:
        dst = out_dir / ("other" if cid == OTHER_ID else str(cid)) / f"{name}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tz.square_crop(im, box, params.crop_context).resize((size, size), Image.BILINEAR).save(dst)
        out.setdefault(cid, []).append(dst)

    groups = list(boxes.groupby("sha256", sort=True))
    n_obj = n_other = 0
    for start in tqdm(range(0, len(groups), params.proposer_batch), desc="scene crops", unit="batch", disable=None):
        chunk = groups[start : start + params.proposer_batch]
        images = [labeling.open_image(inputs.data_dir, paths[sha]) for sha, _ in chunk]
        for (sha, g), im, p in zip(chunk, images, prop.propose(images), strict=True):
            human = g[["x1", "y1", "x2", "y2"]].to_numpy(float)
            for b in g.itertuples():
                save(im, (b.x1, b.y1, b.x2, b.y2), int(b.label_id), f"{sha[:16]}_h{int(b.box_id)}")
                n_obj += int(b.label_id) != OTHER_ID
            overlap = labeling.iou_matrix(np.asarray(p.xyxy, float), human).max(1) if len(p) else np.zeros(0)
            for k in np.flatnonzero(overlap < unmatched_iou):
                save(im, p.xyxy[k], OTHER_ID, f"{sha[:16]}_p{k}")
                n_other += 1
    return out, {"images": len(groups), "objects": n_obj, "other": n_other}


def _chance_warning(domain: str, top1: float | None, n_classes: int) -> str | None:
    """What to tell the user when an expert ends near chance (its labels would be noise), else None."""
    chance = 1.0 / max(1, n_classes)
    if top1 is None or top1 >= 1.5 * chance:
        return None
    return (
        f"expert {domain} learned next to nothing: validation top-1 {top1:.2f}, chance {chance:.2f}. Its labels "
        "will be noise: raise autolabel.experts.epochs, lower autolabel.experts.lr0 (0.002 stayed at chance on "
        "the sample world) or train at the catalogue's size (autolabel.experts.imgsz)."
    )


# ---- fusion ------------------------------------------------------------------------------------------------


def _crops_from_boxes(
    data_dir: Path, manifest: pd.DataFrame, boxes: pd.DataFrame, context: float
) -> tuple[list[Any], np.ndarray]:
    paths = manifest.set_index("sha256")["path"]
    crops, ids = [], []
    for sha, g in boxes.groupby("sha256", sort=True):
        im = labeling.open_image(data_dir, paths[sha])
        for b in g.sort_values("box_id").itertuples():
            crops.append(tz.square_crop(im, (b.x1, b.y1, b.x2, b.y2), context))
            ids.append(int(b.label_id))
    return crops, np.array(ids, np.int64)


def _teacher_outputs(
    specs: list[dict[str, Any]], ontology: Ontology, device: str, crops: list[Any]
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Projected outputs of each teacher on the crops, their coverage, and the number of forward passes."""
    outs, covs, calls = [], [], 0
    for s in specs:
        t = tz.build_teacher(s, ontology, device=device)
        m = tz.OntologyMapping(t.labels, ontology)
        outs.append(m.project(t.predict_proba(crops)))
        covs.append(m.coverage)
        calls += t.calls
    return outs, covs, calls


def prepare_fusion(
    params: AutolabelParams,
    project: ProjectParams,
    ontology: Ontology,
    inputs: Inputs,
    teachers: list[dict[str, Any]],
    single: dict[str, Any] | None,
) -> tuple[FusionSpec, dict[str, Any]]:
    """Fit the fusion on labeled crops (seed human boxes + generic "other" crops) and measure every strategy, the
    single all-domain model and each teacher alone on the gold crops. Cached by a fingerprint of all inputs."""
    f = params.fusion
    out = project.data_dir / "autolabel" / "teachers" / "fusion.json"
    k = len(ontology)
    seed_boxes = fusion_seed(params, inputs)
    gold_m = inputs.manifest[inputs.manifest["split"] == "gold"]
    gold_src = inputs.truth if inputs.truth is not None else inputs.human
    gold_boxes = gold_src[gold_src["sha256"].isin(gold_m["sha256"])]
    spec_files = [labeling.teacher_files(t) for t in (*teachers, *([single] if single else []))]
    fp = pz.fingerprint(
        f.model_dump(),
        params.crop_context,
        [[pz.file_sha256(p) for p in files] for files in spec_files],
        [{k2: v for k2, v in t.items() if k2 != "path"} for t in teachers],
        _frame_hash(seed_boxes),
        _frame_hash(gold_boxes),
        _listing_hash(inputs.world / "generic"),
        [c.en for c in ontology.classes],
    )
    prev = _read_json(out) or {}
    if prev.get("fingerprint") == fp:
        return FusionSpec.model_validate(prev["spec"]), prev["table"]
    t0 = time.perf_counter()
    crops, ids = _crops_from_boxes(inputs.data_dir, inputs.manifest, seed_boxes, params.crop_context)
    generic_yaml = inputs.world / "generic" / "data.yaml"
    if generic_yaml.is_file() and f.other_crops:
        other = tz.generic_crops(
            generic_yaml,
            project.data_dir / "autolabel" / "teachers" / "generic_crops",
            {"val": f.other_crops},
            size=64,
            context=params.crop_context,
            seed=project.seed,
        )["val"]
        from PIL import Image

        crops += [Image.open(p).convert("RGB") for p in other]
        ids = np.concatenate([ids, np.full(len(other), OTHER_ID)])
    if len(crops) == 0:
        raise AutolabelError("no labeled crops to fit the fusion (no seed human boxes and no generic corpus).")
    cols = fz.ids_to_columns(ids, k)
    train_out, coverage, calls = _teacher_outputs(teachers, ontology, project.device, crops)
    weights = [f.weights.get(t["name"], 1.0) for t in teachers]
    if f.fit_weights and not f.weights:
        weights = fz.fit_weights(train_out, coverage, cols)
    meta = (
        fz.StackedModel.fit(train_out, cols, C=f.C, seed=project.seed)
        if len(teachers) > 1 or f.strategy == "stacked"
        else None
    )
    strategies: dict[str, fz.Fusion] = {
        s: fz.Fusion(s, coverage, weights, meta) for s in fz.STRATEGIES if s != "stacked" or meta is not None
    }
    if f.strategy not in strategies:
        raise AutolabelError(f"autolabel.fusion.strategy = {f.strategy}: needs at least two teachers or a meta-model.")
    temperature = fz.fit_temperature(strategies[f.strategy].raw(train_out), cols) if f.calibrate else 1.0
    # the fusion table, on the gold crops
    g_crops, g_ids = _crops_from_boxes(inputs.data_dir, inputs.manifest, gold_boxes, params.crop_context)
    g_cols = fz.ids_to_columns(g_ids, k)
    table: dict[str, Any] = {
        "gold_crops": len(g_cols),
        "gold_objects": int((g_ids >= 0).sum()),
        "train_crops": len(cols),
        "source": "truth" if inputs.truth is not None else "human",
    }
    rows = []
    if len(g_crops):
        gold_out, gold_cov, gcalls = _teacher_outputs(teachers, ontology, project.device, g_crops)
        calls += gcalls
        obj = g_ids >= 0
        everything = np.ones(k + 1, bool)

        def row(name: str, fused: np.ndarray, kind: str, cov: np.ndarray = everything) -> dict[str, Any]:
            pred = fused.argmax(1)
            return {
                "name": name,
                "kind": kind,
                "accuracy": round(float((pred == g_cols).mean()), 4),
                "accuracy_objects": round(float((pred[obj] == g_cols[obj]).mean()), 4) if obj.any() else None,
                **fz.rejection(fused, cov, g_cols),
            }

        fused = {name: fusion(gold_out) for name, fusion in strategies.items()}  # uncalibrated (T 1)
        rows += [row(name, out, "fusion") for name, out in fused.items()]
        raw = fused[f.strategy]
        calibrated = fz.temper(raw, temperature)
        table["calibration"] = {
            "strategy": f.strategy,
            "temperature": round(temperature, 4),
            "ece_before": round(fz.calibration_error(raw, g_cols), 4),
            "ece_after": round(fz.calibration_error(calibrated, g_cols), 4),
            "mean_confidence_before": round(float(raw.max(1).mean()), 4),
            "mean_confidence_after": round(float(calibrated.max(1).mean()), 4),
        }
        # the all-domain model may be among the fused teachers (fusion.include_single): then its gold answers are
        # in gold_out and its one row is the baseline's, not a second "alone" row
        i_single = next((i for i, t in enumerate(teachers) if single and t["path"] == single["path"]), None)
        if single is not None:
            if i_single is not None:
                single_out, single_cov = gold_out[i_single], gold_cov[i_single]
            else:
                s_out, s_cov, scalls = _teacher_outputs([single], ontology, project.device, g_crops)
                calls += scalls
                single_out, single_cov = s_out[0], s_cov[0]
            rows.append(row("single all-domain model", single_out, "single", single_cov))
        rows += [
            row(f"{t['name']} alone", o, "teacher", c)
            for i, (t, o, c) in enumerate(zip(teachers, gold_out, gold_cov, strict=True))
            if i != i_single
        ]
    table["rows"] = rows
    single_row = next((r for r in rows if r["kind"] == "single"), None)
    if single_row and single_row["accuracy"]:
        for r in rows:
            if r["kind"] == "fusion":
                r["vs_single_pct"] = round(100 * (r["accuracy"] - single_row["accuracy"]) / single_row["accuracy"], 1)
    table["weights"] = dict(zip([t["name"] for t in teachers], [round(w, 4) for w in weights], strict=True))
    table["model_calls"] = calls
    table["seconds"] = round(time.perf_counter() - t0, 1)
    spec = FusionSpec(
        strategy=f.strategy,
        weights=[float(w) for w in weights],
        meta=meta.to_dict() if (meta is not None and f.strategy == "stacked") else None,
        temperature=temperature,
    )
    _write_json(out, {"fingerprint": fp, "spec": spec.model_dump(), "table": table})
    return spec, table


def format_fusion_table(table: dict[str, Any]) -> str:
    lines = [
        f"fusion table — accuracy on {table.get('gold_crops', 0)} gold crops ({table.get('gold_objects', 0)} objects, "
        f"the rest distractors = other); fitted on {table.get('train_crops', 0)} labeled crops",
        f"{'':28s} {'all':>7s} {'objects':>8s} {'vs single':>10s}   rejects (says other): other domains, distractors",
    ]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in table.get("rows", []):
        vs = f"{r['vs_single_pct']:+.1f}%" if "vs_single_pct" in r else ""
        rej = f"{cell(r.get('foreign_rejected')):>8s} {cell(r.get('distractors_rejected')):>8s}"
        lines.append(f"{r['name']:28s} {r['accuracy']:7.3f} {cell(r.get('accuracy_objects')):>8s} {vs:>10s}   {rej}")
    cal = fz.describe_calibration(table.get("calibration"))
    if cal:
        lines.append(cal)
    return "\n".join(lines)


# ---- fan-out -----------------------------------------------------------------------------------------------


def prefect_map(runner: str, workers: int = 2, dask_address: str | None = None) -> labeling.MapFn:
    """Shards as Prefect tasks on a thread pool or a Dask cluster (prefect-dask); results as they finish."""

    def _map(spec: LabelerSpec, shards: list[Shard]) -> list[ShardResult]:
        from prefect import flow, task, unmapped
        from prefect.cache_policies import NO_CACHE
        from prefect.futures import as_completed
        from tqdm.auto import tqdm

        if runner == "dask":
            from prefect_dask import DaskTaskRunner

            if dask_address:
                task_runner: Any = DaskTaskRunner(address=dask_address)
            else:
                task_runner = DaskTaskRunner(
                    cluster_kwargs={
                        "n_workers": workers,
                        "threads_per_worker": 1,
                        "processes": True,
                        "dashboard_address": None,
                    }
                )
        else:
            from prefect.task_runners import ThreadPoolTaskRunner

            task_runner = ThreadPoolTaskRunner(max_workers=workers)
        shard_task = task(
            labeling.label_shard, name="autolabel-shard", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE
        )

        @flow(name="autolabel-shards", task_runner=task_runner, log_prints=False, validate_parameters=False)
        def shards_flow(spec: LabelerSpec, shards: list[Shard]) -> list[ShardResult]:
            futures = shard_task.map(unmapped(spec), shards)
            results = []
            sizes = {s.name: len(s.shas) for s in shards}
            with tqdm(total=sum(sizes.values()), desc=f"autolabel ({runner})", unit="img", disable=None) as bar:
                for fut in as_completed(futures):
                    r = fut.result()
                    results.append(r)
                    bar.update(sizes[r.name])
            return sorted(results, key=lambda r: r.name)

        return shards_flow(spec, shards)

    return _map


def map_for(params: AutolabelParams) -> labeling.MapFn:
    runner = params.runner or "threads"
    if runner == "local":
        return labeling.serial_map
    return prefect_map(runner, params.workers, params.dask_address)


# ---- the stage ---------------------------------------------------------------------------------------------


def proposer_spec(params: AutolabelParams, proposer: Path) -> ProposerSpec:
    """How the labeler runs the proposer (also on the seed, for the experts' scene crops)."""
    return ProposerSpec(
        weights=str(proposer),
        imgsz=params.imgsz,
        conf=params.conf,
        iou=params.iou,
        max_det=params.max_det,
        class_aware=params.class_aware,
        batch_size=params.proposer_batch,
        augment=params.augment,
    )


def labeler_spec(
    params: AutolabelParams, project: ProjectParams, proposer: Path, teachers: list[dict[str, Any]], fusion: FusionSpec
) -> LabelerSpec:
    torch_threads = None
    if (params.runner or "threads") == "dask" and not params.dask_address:
        torch_threads = max(1, usable_cores() // params.workers)  # a local cluster shares this machine's cores
    return LabelerSpec(
        data_dir=str(project.data_dir),
        ontology=str(project.ontology),
        parts_dir=str(project.data_dir / "autolabel" / "parts"),
        proposer=proposer_spec(params, proposer),
        teachers=teachers,
        fusion=fusion,
        topk=params.topk,
        crop_context=params.crop_context,
        device=project.device,
        torch_threads=torch_threads,
        proposer_name=f"proposer@{pz.file_sha256(proposer)[:12]}",
    )


def import_reviews(params: AutolabelParams, root: Path, manifest: pd.DataFrame, ontology: Ontology) -> Reviewed:
    reviewed = Reviewed.none()
    for pattern in params.review_imports:
        matches = sorted(glob.glob(str(_resolve(root, pattern))))
        if not matches:
            raise AutolabelError(
                f"autolabel.review_imports: {pattern!r} matches no file. Export the Label Studio project as JSON there."
            )
        for path in matches:
            reviewed = reviewed.update(labeling.import_review(Path(path), manifest, ontology))
    return reviewed


def run(
    params: AutolabelParams,
    project: ProjectParams,
    ontology: Ontology | None = None,
    map_fn: labeling.MapFn | None = None,
) -> AutolabelResult:
    """The whole stage, callable without Prefect (``map_fn`` overrides the fan-out chosen by params)."""
    t_start = time.perf_counter()
    ontology = ontology or Ontology.load(project.ontology)
    data_dir = project.data_dir
    root = data_dir.parent
    out = data_dir / "autolabel"
    inputs = Inputs(data_dir)

    proposer, proposer_source = prepare_proposer(params, project, ontology, inputs)
    teachers, single = prepare_teachers(params, project, ontology, inputs, proposer)
    if single is not None and params.fusion.include_single:
        teachers = [*teachers, {**single, "name": "全域"}]  # one more opinion for the stack; still the table's baseline
    fusion, table = prepare_fusion(params, project, ontology, inputs, teachers, single)
    spec = labeler_spec(params, project, proposer, teachers, fusion)
    _write_json(
        out / tz.TEACHER_FILE,
        {
            "teachers": teachers,
            "fusion": fusion.model_dump(),
            "ontology": str(project.ontology),
            "crop_context": params.crop_context,
        },
    )

    wanted = inputs.manifest[inputs.manifest["split"].isin(params.splits)]
    items = list(zip(wanted["sha256"], wanted["path"], strict=True))
    stats = labeling.run_shards(spec, items, params.shard_size, map_fn or map_for(params))

    reviewed = import_reviews(params, root, inputs.manifest, ontology)
    labels_path = out / "labels.parquet"
    asm = labeling.assemble(
        Path(stats.version_dir),
        [s for s, _ in items],
        labels_path,
        teacher_threshold=params.teacher_threshold,
        review_threshold=params.review_threshold,
        proposer=spec.proposer_name,
        reviewed=reviewed,
    )
    labels = contracts.read("labels", labels_path)
    pv, tv = spec.versions()
    tasks_path = labeling.export_review(
        labels,
        inputs.manifest,
        ontology,
        out / "review",
        image_root=params.review_image_root,
        max_tasks=params.review_max_tasks,
        model_version=f"wanwu-autolabel@{pv}-{tv}",
    )
    n_tasks = len(json.loads(tasks_path.read_text(encoding="utf-8")))

    metrics: dict[str, Any] = {
        "proposer": {"path": str(proposer), "source": proposer_source, "version": pv},
        "teachers": {"names": [t["name"] for t in teachers], "version": tv, "fusion": fusion.strategy},
        "run": {
            "images": stats.images,
            "cached_images": stats.cached_images,
            "labeled_images": stats.labeled_images,
            "shards": stats.shards,
            "model_calls": stats.model_calls,
            "labeling_seconds": round(stats.seconds, 3),
            "images_per_s": round(stats.labeled_images / stats.seconds, 2)
            if stats.labeled_images and stats.seconds
            else None,
        },
        "labels": {
            "boxes": len(labels),
            "needs_review": int(labels["needs_review"].sum()),
            "other": int((labels["label_id"] == OTHER_ID).sum()),
            "review_tasks": n_tasks,
            **asm,
        },
        "fusion_table": table,
    }
    if inputs.truth is not None:
        truth = inputs.truth[inputs.truth["sha256"].isin(wanted["sha256"])]
        metrics["precision_recall"] = labeling.precision_recall(labels, truth, ontology, params.match_iou)
        accepted = labels[~labels["needs_review"]]
        metrics["precision_recall_accepted"] = labeling.precision_recall(accepted, truth, ontology, params.match_iou)[
            "overall"
        ]
        gold = set(inputs.manifest.loc[inputs.manifest["split"] == "gold", "sha256"])
        if gold & set(wanted["sha256"]):
            metrics["precision_recall_gold"] = labeling.precision_recall(
                labels[labels["sha256"].isin(gold)], truth[truth["sha256"].isin(gold)], ontology, params.match_iou
            )["overall"]
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    metrics_path = _write_json(out / "metrics.json", metrics)
    overall = metrics.get("precision_recall", {}).get("overall", {})
    return AutolabelResult(
        labels=str(labels_path),
        review_tasks=str(tasks_path),
        metrics=str(metrics_path),
        proposer=str(proposer),
        proposer_source=proposer_source,
        teachers=[t["name"] for t in teachers],
        images=stats.images,
        cached_images=stats.cached_images,
        labeled_images=stats.labeled_images,
        boxes=len(labels),
        needs_review=int(labels["needs_review"].sum()),
        review_tasks_count=n_tasks,
        model_calls=stats.model_calls,
        labeling_seconds=round(stats.seconds, 3),
        seconds=metrics["seconds"],
        precision=overall.get("precision"),
        recall=overall.get("recall"),
        fusion_strategy=fusion.strategy,
    )


def print_summary(result: AutolabelResult) -> None:
    metrics = json.loads(Path(result.metrics).read_text(encoding="utf-8"))
    print(format_fusion_table(metrics["fusion_table"]))
    pr = metrics.get("precision_recall")
    if pr:
        o = pr["overall"]
        print(
            f"auto labels vs truth (IoU ≥ {pr['iou']}, right class): precision {o['precision']}, "
            f"recall {o['recall']} ({o['tp']} hits of {o['predicted']} boxes, {o['truth']} objects); "
            f"localisation recall {pr['localisation_recall']}"
        )
    print(
        f"{result.images} images ({result.cached_images} cached, {result.model_calls} model calls), "
        f"{result.boxes} boxes, {result.needs_review} need review → {result.review_tasks} "
        f"({result.review_tasks_count} tasks); {result.seconds:.1f} s"
    )


def run_stage(params: Params) -> AutolabelResult:
    """`wanwu stage autolabel`: the stage with its own params section, tracked in MLflow."""
    from wanwu.tracking import stage_run

    root = params.project.data_dir.parent
    al = params.autolabel
    if al.runner is None:  # the fan-out follows the orchestration section unless autolabel says otherwise
        orch = params.orchestration
        al = al.model_copy(update={"runner": orch.task_runner, "dask_address": al.dask_address or orch.dask_address})
    flat = {f"autolabel.{k}": v for k, v in al.model_dump(exclude={"teachers"}).items()}
    with stage_run("autolabel", root, params=flat):
        import mlflow

        result = run(al, params.project)
        metrics = {
            k: v
            for k, v in {
                "precision": result.precision,
                "recall": result.recall,
                "boxes": result.boxes,
                "needs_review": result.needs_review,
                "model_calls": result.model_calls,
                "labeling_seconds": result.labeling_seconds,
                "cached_images": result.cached_images,
            }.items()
            if v is not None
        }
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(result.metrics)
    print_summary(result)
    return result


def _task() -> Any:
    import prefect

    return prefect.task(run, name="autolabel", retries=1, retry_delay_seconds=5)


__getattr__ = lazy_task(globals(), "autolabel", _task)
