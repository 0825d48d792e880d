"""Stage results cached by their inputs, not by run id: an unchanged stage costs almost nothing on a re-run.

The key of a stage is a content hash of what ``dvc.yaml`` declares it depends on (its code, its input data) and
its params sections, so the flow and ``dvc repro`` agree on what "changed" means. Two stages read state from
outside the project: collect reads the user's sources (never cached: its own skip index makes a re-run cheap) and
promote reads the registry's champion (its alias is part of the key). evaluate is keyed like ``dvc repro`` keys
it, without the champion: when the champion moved since the evaluation, the gate compares with the champion's
figures recorded at its promotion (:func:`wanwu.registry.promote`), so a re-run with nothing changed re-evaluates
nothing.
Wiring only: the stage functions are untouched; Prefect stores the results (JSON) and looks the keys up.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

UNCACHED = {"collect"}  # sources change outside the flow's view; collect skips seen inputs itself
REGISTRY_STATE = {"promote"}  # it moves the champion alias: the alias is part of its key
_IGNORED_SUFFIXES = (".cache", ".tmp", ".lock", ".pyc")


def _hash_path(h: Any, path: Path) -> None:
    if path.is_file():
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            # Python writes __pycache__ into code folders when it imports them: not a change (.dvcignore agrees)
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(_IGNORED_SUFFIXES) or name.startswith("."):
                    continue
                p = Path(dirpath) / name
                h.update(str(p.relative_to(path)).encode())
                _hash_path(h, p)
    else:
        h.update(b"<missing>" + str(path).encode())


def stage_spec(root: Path, stage: str) -> dict[str, Any]:
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    return (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage, {})


def _champion() -> str:
    try:
        from wanwu import registry

        champ = registry.get_alias(registry.CHAMPION)
    except Exception:  # no store yet, no model yet: nothing to key on
        return "none"
    return f"{registry.model_name()}@{champ.version if champ else 'none'}"


def stage_key(root: Path, stage: str, params: Any) -> str | None:
    """The content key of ``stage``'s inputs, or None when the stage is never cached."""
    if stage in UNCACHED:
        return None
    spec = stage_spec(root, stage)
    # The project folder is part of the key: results hold its paths, so another checkout never reuses them.
    h = hashlib.sha256(f"{stage}\0{Path(root).resolve()}".encode())
    sections = spec.get("params") or [stage]
    for section in sorted({*(s if isinstance(s, str) else next(iter(s)) for s in sections), stage}):
        record = getattr(params, section, None)
        if record is not None:
            h.update(json.dumps(record.model_dump(mode="json"), sort_keys=True, default=str).encode())
    for dep in spec.get("deps") or []:
        _hash_path(h, root / dep)
    if stage in REGISTRY_STATE:
        h.update(_champion().encode())
    return f"wanwu-{stage}-{h.hexdigest()}"


def missing_outputs(root: Path, stage: str) -> list[str]:
    """The outputs ``dvc.yaml`` declares for ``stage`` that are not on disk (deleted by hand, or never made).

    Not part of the key: before a first run every output is missing, so the key would never match the next run's.
    """
    names = [out if isinstance(out, str) else next(iter(out)) for out in stage_spec(root, stage).get("outs") or []]
    return [name for name in names if not (Path(root) / name).exists()]


def cached(task: Any, key: str | None, refresh: bool = False) -> Any:
    """``task`` with its result cached under ``key`` (persisted as JSON), or ``task`` itself when key is None.

    ``refresh``: run even when the key is known (its outputs are gone) and store the new result under it.
    """
    if key is None:
        return task
    from prefect.cache_policies import CacheKeyFnPolicy

    return task.with_options(
        cache_policy=CacheKeyFnPolicy(cache_key_fn=lambda *_: key),
        persist_result=True,
        result_serializer="json",
        refresh_cache=refresh,
    )
