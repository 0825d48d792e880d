import pandas as pd
import pytest

from wanwu import contracts
from wanwu.contracts import ContractError


def _labels(**over):
    row = dict(
        sha256="a" * 64,
        box_id=0,
        x1=1.0,
        y1=2.0,
        x2=10.0,
        y2=12.0,
        proposer="human",
        proposer_conf=1.0,
        topk_ids=[3],
        topk_probs=[1.0],
        label_id=3,
        confidence=1.0,
        origin="human",
        needs_review=False,
        source_label="fish",
    )
    row.update(over)
    return pd.DataFrame([row])


def test_labels_round_trip_keeps_types_and_lists(tmp_path):
    path = contracts.write("labels", _labels(), tmp_path / "labels.parquet")
    back = contracts.read("labels", path)
    assert list(back.columns) == contracts.SCHEMAS["labels"].names
    assert list(back.loc[0, "topk_ids"]) == [3]
    assert back.loc[0, "x2"] == pytest.approx(10.0)


def test_a_table_off_contract_is_never_written(tmp_path):
    target = tmp_path / "labels.parquet"
    with pytest.raises(ContractError, match="missing \\['source_label'\\]"):
        contracts.write("labels", _labels().drop(columns=["source_label"]), target)
    with pytest.raises(ContractError, match="x2 > x1"):
        contracts.write("labels", _labels(x2=0.5), target)
    with pytest.raises(ContractError, match="origin values \\['robot'\\]"):
        contracts.write("labels", _labels(origin="robot"), target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_reading_a_missing_or_foreign_table_says_which_stage_to_run(tmp_path):
    with pytest.raises(ContractError, match="Run the stage that writes it first"):
        contracts.read("manifest", tmp_path / "manifest.parquet")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(ContractError, match="does not match the manifest contract"):
        contracts.read("manifest", tmp_path / "manifest.parquet")
