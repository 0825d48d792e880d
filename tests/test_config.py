from pathlib import Path

import pytest

from wanwu.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_parse_into_typed_records():
    p = load_params(ROOT / "params.yaml")
    assert p.project.data_dir == ROOT / "data"
    assert p.project.ontology == ROOT / "ontology.yaml"
    assert p.collect.sources[0].uri.startswith("sample://")
    assert isinstance(p.collect.workers, int)


def test_a_wrong_value_names_the_key_the_value_and_what_is_allowed(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("collect:\n  jpeg_quality: 300\n  workers: many\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "collect.jpeg_quality = 300: Input should be less than or equal to 100" in msg
    assert "collect.workers = 'many'" in msg


def test_a_misspelt_key_is_an_error_not_ignored(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("collect:\n  jpg_quality: 90\n")
    with pytest.raises(ParamsError, match="collect.jpg_quality: unknown key"):
        load_params(f)


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("collect:\n  workers: 2\n")
    p = load_params(f, {"collect.workers": "3", "project.seed": "7"})
    assert p.collect.workers == 3 and p.project.seed == 7


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "none.yaml")
    f = tmp_path / "params.yaml"
    f.write_text("collect: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(f)
