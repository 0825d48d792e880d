"""The Parquet tables stages hand each other: one Arrow schema each, checked on every write and read.

A table that does not match its schema is never written; the error names the table, the column and the fix.
Writes go to a temporary file in the same folder and are renamed into place, so a killed process never leaves
a half-written table that looks complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class ContractError(ValueError):
    """A table does not match its contract."""


_TS = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    # One row per stored image.
    "manifest": pa.schema(
        [
            ("sha256", pa.string()),  # of the decoded, oriented RGB pixels: identity across containers
            ("path", pa.string()),  # relative to the data folder
            ("source", pa.string()),  # where it came from (file path, URL, sample://…#index)
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("format", pa.string()),  # the original container (JPEG, PNG, …)
            ("bytes", pa.int64()),  # the original file size
            ("ingested_at", _TS),
            ("split", pa.string()),  # collect-time role: gold (test only) | seed (human-labeled) | pool (unlabeled)
            ("phash", pa.string()),  # perceptual hash (hex), for near-duplicate checks downstream
        ]
    ),
    # One row per input that was not stored, with the reason.
    "rejects": pa.schema(
        [
            ("source", pa.string()),
            ("reason", pa.string()),  # a short code: empty, truncated, not_image, too_large, bomb, duplicate, …
            ("detail", pa.string()),  # the human-readable why
            ("sha256", pa.string()),  # the kept image's hash for duplicates, else null
            ("rejected_at", _TS),
        ]
    ),
    # One row per box: auto labels, human labels and (in the sample world) the truth share this schema.
    "labels": pa.schema(
        [
            ("sha256", pa.string()),
            ("box_id", pa.int32()),  # per image, 0..n-1
            ("x1", pa.float32()),  # pixels in the stored image
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            ("proposer", pa.string()),  # model version that proposed the box, or "human" / "truth"
            ("proposer_conf", pa.float32()),
            ("topk_ids", pa.list_(pa.int32())),  # teacher's top-k ontology ids (−1 = other), best first
            ("topk_probs", pa.list_(pa.float32())),  # their probabilities; sum ≤ 1
            ("label_id", pa.int32()),  # ontology id, −1 = other
            ("confidence", pa.float32()),
            ("origin", pa.string()),  # auto | human | truth
            ("needs_review", pa.bool_()),
            ("source_label", pa.string()),  # the name the box had before mapping (imports), else null
        ]
    ),
    # One row per image with an image-level class (class-folder datasets, catalogues).
    "image_labels": pa.schema(
        [
            ("sha256", pa.string()),
            ("label_id", pa.int32()),
            ("source_label", pa.string()),
            ("origin", pa.string()),
        ]
    ),
}

ORIGINS = {"auto", "human", "truth"}
SPLITS = {"gold", "seed", "pool"}


def empty(name: str) -> pd.DataFrame:
    return SCHEMAS[name].empty_table().to_pandas()


def to_table(name: str, df: pd.DataFrame) -> pa.Table:
    """Convert and check a DataFrame against its contract."""
    schema = SCHEMAS[name]
    missing = [f.name for f in schema if f.name not in df.columns]
    extra = [c for c in df.columns if c not in schema.names]
    if missing or extra:
        raise ContractError(
            f"{name}: columns do not match the contract (missing {missing}, unexpected {extra}); "
            f"the contract is {schema.names} (wanwu/contracts.py)"
        )
    try:
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise ContractError(f"{name}: a column has values of the wrong type: {e}") from e
    _check_values(name, table)
    return table


def _check_values(name: str, table: pa.Table) -> None:
    df = table.to_pandas()
    if name in ("manifest", "labels", "image_labels") and df["sha256"].isna().any():
        raise ContractError(f"{name}: sha256 may not be null")
    if name == "manifest":
        if df["sha256"].duplicated().any():
            raise ContractError(
                f"manifest: duplicate sha256 {df.loc[df['sha256'].duplicated(), 'sha256'].tolist()[:3]}"
            )
        bad = set(df["split"].dropna()) - SPLITS
        if bad:
            raise ContractError(f"manifest: split values {sorted(bad)} not in {sorted(SPLITS)}")
    if name == "labels" and len(df):
        if df.duplicated(["sha256", "box_id", "origin"]).any():
            raise ContractError("labels: (sha256, box_id, origin) must be unique")
        bad = set(df["origin"]) - ORIGINS
        if bad:
            raise ContractError(f"labels: origin values {sorted(bad)} not in {sorted(ORIGINS)}")
        if ((df["x2"] <= df["x1"]) | (df["y2"] <= df["y1"])).any():
            raise ContractError("labels: every box needs x2 > x1 and y2 > y1")


def write(name: str, df: pd.DataFrame, path: str | Path) -> Path:
    """Check ``df`` against contract ``name`` and write it atomically to ``path``."""
    return write_atomic(to_table(name, df), path)


def temp_beside(path: Path, stem: str | None = None) -> tuple[int, str]:
    """A temp file beside ``path`` named ``.<stem>.<pid>.<random>.tmp``: :func:`remove_stale_temps` can tell
    whether its writer is still alive."""
    return tempfile.mkstemp(prefix=f".{stem or path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def remove_stale_temps(folder: Path, stem: str = "") -> int:
    """Remove the temp files (of :func:`temp_beside`) in ``folder`` whose writer is gone, e.g. killed mid-write.

    Such a file was never renamed and never will be; left alone, DVC would track it with the outputs (found by
    tests/test_faults.py). A live writer's file, this process's included, is left alone.
    """
    n = 0
    for tmp in Path(folder).glob(f".{stem}*.tmp"):
        try:
            pid = int(tmp.name.split(".")[-3])
        except (ValueError, IndexError):
            continue  # not named by temp_beside
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive
        except PermissionError:
            continue  # alive, another user's
        except OSError:
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def write_atomic(table: pa.Table | pd.DataFrame, path: str | Path) -> Path:
    """Write a Parquet table through a temp file and a rename: a killed process never leaves half a table."""
    path = Path(path)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(name: str, path: str | Path) -> pd.DataFrame:
    """Read a table and check it against its contract (an old or foreign file fails here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: no {name} table here. Run the stage that writes it first.")
    table = pq.read_table(path)
    if not table.schema.equals(SCHEMAS[name], check_metadata=False):
        try:
            table = table.select(SCHEMAS[name].names).cast(SCHEMAS[name])
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
            raise ContractError(f"{path}: does not match the {name} contract ({e}). Re-run its stage.") from e
    return table.to_pandas()
