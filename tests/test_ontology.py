from pathlib import Path

import pytest

from wanwu.ontology import OTHER_ID, Ontology, OntologyError, UnknownLabel, normalize_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onto() -> Ontology:
    return Ontology.load(ROOT / "ontology.yaml")


def test_project_ontology_covers_four_domains_and_twelve_classes(onto):
    domains = onto.by_domain()
    assert set(domains) == {"动物", "植物", "商品", "地标"}
    assert len(onto) >= 12
    assert all(len(ids) >= 3 for ids in domains.values())


@pytest.mark.parametrize(
    "name, expected_en",
    [
        ("猫", "cat"),
        ("Cat", "cat"),
        ("  CAT  ", "cat"),
        ("ｃａｔ", "cat"),  # full-width letters
        ("kitten", "cat"),
        ("Cell-Phone", "mobile phone"),
        ("cell   phone", "mobile phone"),
        ("智能手机", "mobile phone"),
        ("Mt. Fuji", "mount fuji"),
        ("东京铁塔", "tokyo tower"),
    ],
)
def test_lookup_maps_any_synonym_in_either_language(onto, name, expected_en):
    assert onto.en(onto.lookup(name)) == expected_en


def test_unknown_name_is_refused_with_the_closest_names(onto):
    with pytest.raises(UnknownLabel) as e:
        onto.lookup("cats")
    assert "猫 (cat)" in str(e.value)
    assert e.value.suggestions[0] == "猫 (cat)"
    assert onto.lookup_or_other("raccoon") == OTHER_ID
    assert onto.zh(OTHER_ID) == "其他"


def test_normalize_name_folds_width_case_and_spaces():
    assert normalize_name("Ｍｏｂｉｌｅ\u3000PHONE") == "mobile phone"


def test_duplicate_names_across_classes_are_rejected_naming_both(tmp_path):
    bad = tmp_path / "ontology.yaml"
    bad.write_text(
        "classes:\n"
        "  - {id: 0, zh: 猫, en: cat, domain: 动物, synonyms: [kitty]}\n"
        "  - {id: 1, zh: 狗, en: dog, domain: 动物, synonyms: [Kitty]}\n",
        encoding="utf-8",
    )
    with pytest.raises(OntologyError, match=r"ontology.yaml.*'Kitty' belongs to class 0 and class 1"):
        Ontology.load(bad)


def test_gaps_in_ids_and_unknown_domains_are_rejected(tmp_path):
    bad = tmp_path / "o.yaml"
    bad.write_text("domains: [动物]\nclasses:\n  - {id: 1, zh: 猫, en: cat, domain: 动物}\n", encoding="utf-8")
    with pytest.raises(OntologyError, match="ids must be 0..0"):
        Ontology.load(bad)
    bad.write_text("domains: [动物]\nclasses:\n  - {id: 0, zh: 猫, en: cat, domain: 植物}\n", encoding="utf-8")
    with pytest.raises(OntologyError, match="domain '植物'"):
        Ontology.load(bad)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(OntologyError, match="not found"):
        Ontology.load(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("classes: [\n", encoding="utf-8")
    with pytest.raises(OntologyError, match="broken.yaml: not valid YAML"):
        Ontology.load(broken)
