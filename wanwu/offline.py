"""Offline hardening, in one place, applied by every entry point (CLI, flows, tests).

Nothing here runs at import time. :func:`harden` must run before ultralytics or great_expectations is imported,
because both read their switches from the environment on import:

- ultralytics offline (``YOLO_OFFLINE``) with its settings folder inside the project (``YOLO_CONFIG_DIR``), so it
  never reaches for a hub and never writes into the user's home;
- a CJK font from the package registry (Noto Sans CJK SC) where ultralytics looks for ``Arial.Unicode.ttf`` and
  registered with matplotlib, so Chinese class names plot as glyphs, not empty boxes;
- great-expectations analytics off;
- one MLflow store: ``sqlite:///<root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set, and ultralytics' own
  MLflow callback pointed at the same store.

:func:`doctor` reports what is ready and what is not, with the fix for each.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

FONT_FAMILY = "Noto Sans CJK SC"
_FONT_FACE_INDEX = 2  # NotoSansCJK-Regular.ttc: 0 JP, 1 KR, 2 SC, 3 TC, 4 HK
_ULTRALYTICS_FONT = "Arial.Unicode.ttf"  # the file ultralytics' Annotator asks for when labels are not ASCII


def state_dir(root: Path) -> Path:
    """Project-local state that is neither data nor a run output (tool settings, the extracted font)."""
    return Path(root) / ".wanwu"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def artifact_root(root: Path) -> str:
    return os.environ.get("WANWU_ARTIFACT_ROOT") or (Path(root) / "mlartifacts").resolve().as_uri()


def _collection_path() -> Path | None:
    try:
        import noto_cjk_sans_otc  # the Noto Sans CJK collection, shipped on PyPI
    except ImportError:
        return None
    path = Path(noto_cjk_sans_otc.__file__).parent / "NotoSansCJK-Regular.ttc"
    return path if path.is_file() else None


def cjk_font(root: Path) -> Path | None:
    """A single-face Simplified Chinese font file, extracted once from the collection into the state folder."""
    target = state_dir(root) / "fonts" / "NotoSansCJKsc-Regular.otf"
    if target.is_file():
        return target
    source = _collection_path()
    if source is None:
        return None
    from fontTools.ttLib import TTCollection

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    TTCollection(str(source)).fonts[_FONT_FACE_INDEX].save(str(tmp))
    os.replace(tmp, target)
    return target


def _ultralytics_dir(root: Path) -> Path:
    """ultralytics' USER_CONFIG_DIR: $YOLO_CONFIG_DIR/Ultralytics (it appends the sub-folder itself)."""
    return Path(os.environ.get("YOLO_CONFIG_DIR", state_dir(root))) / "Ultralytics"


def _install_font(root: Path, font: Path) -> None:
    ul_dir = _ultralytics_dir(root)
    ul_dir.mkdir(parents=True, exist_ok=True)
    for name in (_ULTRALYTICS_FONT, "Arial.ttf"):
        dest = ul_dir / name
        if not dest.exists():
            try:
                dest.symlink_to(font)
            except OSError:
                shutil.copyfile(font, dest)


def register_matplotlib_font(font: Path | None) -> None:
    """Make matplotlib draw Chinese with the CJK font (call before plotting)."""
    if font is None:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import font_manager

    if FONT_FAMILY not in {f.name for f in font_manager.fontManager.ttflist}:
        font_manager.fontManager.addfont(str(font))
    families = list(matplotlib.rcParams["font.sans-serif"])
    if families[:1] != [FONT_FAMILY]:
        matplotlib.rcParams["font.sans-serif"] = [FONT_FAMILY, *[f for f in families if f != FONT_FAMILY]]
    matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["axes.unicode_minus"] = False


_hardened: Path | None = None


def harden(root: str | Path = ".") -> Path:
    """Apply every offline switch for the project at ``root``; idempotent, cheap after the first call."""
    global _hardened
    root = Path(root).resolve()
    if _hardened == root:
        return root
    sd = state_dir(root)
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(sd))
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MODELSCOPE_CACHE", str(sd / "modelscope"))
    os.environ.setdefault("TORCH_HOME", str(sd / "torch"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    # ultralytics' own callback reads these: same store, the pipeline's experiment, our run nesting.
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "wanwu")
    os.environ.setdefault("MLFLOW_KEEP_RUN_ACTIVE", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PREFECT_HOME", str(sd / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Prefect's temporary local API gets 20 s to start by default: too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    font = cjk_font(root)
    if font is not None:
        _install_font(root, font)
    _hardened = root
    return root


# ---- doctor ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def checks(root: Path, params_path: Path | None = None) -> list[Check]:
    """Everything a first run needs, each with the fix when it is missing."""
    root = Path(root).resolve()
    harden(root)
    out: list[Check] = []

    params_path = params_path or root / "params.yaml"
    try:
        from wanwu.config import load_params

        params = load_params(params_path)
        out.append(Check("params", True, f"{params_path} parses"))
    except Exception as e:  # the message is the point here
        params = None
        out.append(Check("params", False, str(e).splitlines()[0], "fix the key named above in params.yaml"))

    if params is not None:
        try:
            from wanwu.ontology import Ontology

            onto = Ontology.load(params.project.ontology)
            out.append(Check("ontology", True, f"{len(onto)} classes in {len(onto.by_domain())} domains"))
        except Exception as e:
            out.append(Check("ontology", False, str(e), "fix ontology.yaml as the message says"))

    offline = os.environ.get("YOLO_OFFLINE") == "true"
    out.append(
        Check("offline mode", offline, f"YOLO_OFFLINE={os.environ.get('YOLO_OFFLINE')}", "export YOLO_OFFLINE=true")
    )

    font = cjk_font(root)
    ul_font = _ultralytics_dir(root) / _ULTRALYTICS_FONT
    font_ok = font is not None and ul_font.exists()
    out.append(
        Check(
            "CJK font",
            font_ok,
            f"{FONT_FAMILY} at {font}" if font_ok else "no CJK font: Chinese labels would plot as empty boxes",
            "make venv (installs noto-cjk-sans-otc from requirements.lock)",
        )
    )

    uri = os.environ["MLFLOW_TRACKING_URI"]
    store_ok = uri.startswith(("sqlite:", "http:", "https:", "postgresql:", "databricks"))
    detail = uri
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        store_ok = store_ok and os.access(db.parent, os.W_OK)
        detail += " (exists)" if db.exists() else " (created on the first run)"
    out.append(
        Check(
            "MLflow store",
            store_ok,
            detail,
            "set MLFLOW_TRACKING_URI to sqlite:///path/mlflow.db or an MLflow server (MLflow 3 refuses ./mlruns)",
        )
    )

    prefect_api = os.environ.get("PREFECT_API_URL")
    out.append(
        Check(
            "Prefect API",
            True,
            prefect_api or "none set: flows start Prefect's temporary local API (about 8 s on the first run)",
        )
    )

    dvc_ok = (root / ".dvc").is_dir()
    out.append(Check("DVC", dvc_ok, "initialised" if dvc_ok else "no .dvc folder", "run `dvc init` in the project"))

    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:0 ({torch.cuda.get_device_name(0)})"
        else:
            device = f"cpu ({os.cpu_count()} cores): defaults are sized for it"
        out.append(Check("device", True, device))
    except Exception as e:
        out.append(Check("device", False, f"torch does not import: {e}", "make venv"))

    data_dir = params.project.data_dir if params else root / "data"
    probe = data_dir if data_dir.exists() else root
    free_gb = shutil.disk_usage(probe).free / 2**30
    out.append(
        Check(
            "free disk",
            free_gb >= 5,
            f"{free_gb:.1f} GiB free at {probe}",
            "free space or point project.data_dir at a larger disk (the default run needs about 2 GiB)",
        )
    )
    return out


def doctor(root: Path, params_path: Path | None = None) -> bool:
    from rich.console import Console
    from rich.table import Table

    results = checks(root, params_path)
    table = Table(title="wanwu doctor", show_lines=False)
    table.add_column("check")
    table.add_column("")
    table.add_column("detail")
    table.add_column("fix")
    for c in results:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]NO[/]", c.detail, "" if c.ok else c.fix)
    Console().print(table)
    return all(c.ok for c in results)
