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
    ``sample://?n=…&seed=…`` or a labeled dataset (``format`` yolo / voc / coco / folders).
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


class StageParams(_Section):
    """A later stage's section: accepted as it is until that stage defines its record."""

    model_config = ConfigDict(extra="allow")


class Params(_Section):
    project: ProjectParams = ProjectParams()
    collect: CollectParams = CollectParams()
    autolabel: StageParams = StageParams()
    quality: StageParams = StageParams()
    train: StageParams = StageParams()
    distill: StageParams = StageParams()
    evaluate: StageParams = StageParams()
    export: StageParams = StageParams()
    promote: StageParams = StageParams()
    serve: StageParams = StageParams()
    orchestration: StageParams = StageParams()

    # ---- paths every stage agrees on -----------------------------------------------------------------
    def resolve(self, root: Path) -> Params:
        """Make relative paths absolute against the project root (the folder of params.yaml)."""
        p = self.model_copy(deep=True)
        if not p.project.data_dir.is_absolute():
            p.project.data_dir = root / p.project.data_dir
        if not p.project.ontology.is_absolute():
            p.project.ontology = root / p.project.ontology
        return p


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid value(s):"]
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


def project_root() -> Path:
    """The folder holding params.yaml: $WANWU_ROOT, else the current directory."""
    return Path(os.environ.get("WANWU_ROOT", ".")).resolve()
