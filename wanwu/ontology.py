"""The label space: classes with Chinese and English names, synonyms, domains and prompts.

Every label anywhere in wanwu is an ontology id. Free text (a dataset's class name, a recognizer's label) is
turned into an id once, through :meth:`Ontology.lookup`, and never compared as a string afterwards.
"""

from __future__ import annotations

import difflib
import unicodedata
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OTHER_ID = -1
"""Id of everything that maps onto no class ("其他 / other"): kept, never silently dropped."""
OTHER_ZH = "其他"
OTHER_EN = "other"


class OntologyError(ValueError):
    """The ontology file is malformed; the message names the file and the fix."""


class UnknownLabel(KeyError):
    """A name that maps to no class; carries the closest known names."""

    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown label {name!r}: it is no class name or synonym in the ontology.{hint}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


def normalize_name(text: str) -> str:
    """Case-, width- and whitespace-insensitive key: NFKC folds full-width forms, casefold folds case."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = text.replace("_", " ").replace("-", " ")
    return " ".join(text.split())


class OntologyClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0)
    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    synonyms: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.zh, self.en, *self.synonyms)


class Ontology(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    domains: tuple[str, ...] = ()
    classes: tuple[OntologyClass, ...]

    @field_validator("classes")
    @classmethod
    def _not_empty(cls, v: tuple[OntologyClass, ...]) -> tuple[OntologyClass, ...]:
        if not v:
            raise ValueError("the ontology has no classes")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Ontology:
        ids = [c.id for c in self.classes]
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..{len(ids) - 1} without gaps or repeats, got {sorted(ids)}")
        seen: dict[str, int] = {}
        for c in self.classes:
            if self.domains and c.domain not in self.domains:
                raise ValueError(f"class {c.id} ({c.zh}) has domain {c.domain!r}, not one of {list(self.domains)}")
            for name in c.names:
                key = normalize_name(name)
                if key in seen and seen[key] != c.id:
                    raise ValueError(
                        f"the name {name!r} belongs to class {seen[key]} and class {c.id}: "
                        "a name or synonym may name one class only. Fix: keep it in one class, remove it from the other"
                    )
                seen[key] = c.id
        return self

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Ontology:
        path = Path(path)
        if not path.is_file():
            raise OntologyError(f"{path}: ontology file not found. Point `project.ontology` in params.yaml at it.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise OntologyError(f"{path}: not valid YAML ({e}). Fix the syntax at the line shown.") from e
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                (".".join(str(x) for x in err["loc"]) + ": " if err["loc"] else "")
                + err["msg"].removeprefix("Value error, ")
                for err in e.errors()
            )
            raise OntologyError(f"{path}: invalid ontology: {problems}") from None

    # ---- lookups -------------------------------------------------------------------------------------
    @cached_property
    def _index(self) -> dict[str, int]:
        return {normalize_name(n): c.id for c in self.classes for n in c.names}

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, class_id: int) -> OntologyClass:
        if not 0 <= class_id < len(self.classes):
            raise KeyError(f"class id {class_id} is not in the ontology (0..{len(self.classes) - 1})")
        return self.classes[class_id]

    def lookup(self, name: str) -> int:
        """Map any name or synonym, in either language, to its class id; raise UnknownLabel otherwise."""
        key = normalize_name(name)
        if key in self._index:
            return self._index[key]
        close = difflib.get_close_matches(key, list(self._index), n=3, cutoff=0.5)
        suggestions = []
        for k in close:
            c = self.classes[self._index[k]]
            label = f"{c.zh} ({c.en})"
            if label not in suggestions:
                suggestions.append(label)
        raise UnknownLabel(name, suggestions)

    def lookup_or_other(self, name: str) -> int:
        try:
            return self.lookup(name)
        except UnknownLabel:
            return OTHER_ID

    def zh(self, class_id: int) -> str:
        return OTHER_ZH if class_id == OTHER_ID else self[class_id].zh

    def en(self, class_id: int) -> str:
        return OTHER_EN if class_id == OTHER_ID else self[class_id].en

    @property
    def names_zh(self) -> dict[int, str]:
        """id → Chinese name, the form ultralytics' data.yaml takes."""
        return {c.id: c.zh for c in self.classes}

    def by_domain(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for c in self.classes:
            out.setdefault(c.domain, []).append(c.id)
        return out
