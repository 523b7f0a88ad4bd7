"""Expression templates as data: the YAML file, its pydantic models and noun forms.

The bundled file is ``configs/templates/expressions.yaml``; ``expressions.templates``
in the run config points at another. A template names a family and its
parameters (``geometry`` gives them exact meaning) and lists texts per kind
and number:

.. code-block:: yaml

    - id: relation.left_of
      family: relation
      relation: left_of
      description: ["the {noun} to the left of the {anchor}"]
      description_plural: ["the {plural} to the left of the {anchor}"]
      phrase: ["{noun} left of {anchor}"]

Placeholders: ``{noun}`` (singular name of the target category), ``{plural}``
(its plural) and ``{anchor}`` (singular name of the anchor category; relation
templates only). Singular texts must use ``{noun}``; plural texts ``{plural}``.
Unknown placeholders, a relation text without ``{anchor}`` and duplicate ids
are errors that name the template and the text.
"""

from __future__ import annotations

import functools
import re
import string
from importlib import resources
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orsgen.stages.expressions.geometry import ABSOLUTE_REGIONS, ORDINAL_SIDES, RELATIONS, SIZE_ORDERS

DEFAULT_TEMPLATES = "expressions.yaml"
_ALLOWED = {"noun", "plural", "anchor"}
_FAMILIES = ("absolute", "ordinal", "size", "relation")


class TemplateError(ValueError):
    """The templates file is invalid; the message names the key and the value."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _placeholders(text: str) -> set[str]:
    names = set()
    for _lit, field, _spec, _conv in string.Formatter().parse(text):
        if field is not None:
            names.add(field)
    return names


class _TemplateBase(_Model):
    """Fields every template family shares.

    Attributes:
        id: unique template id (``family.name``); stored on samples.
        enabled: a disabled template is loaded and checked but never used.
        min_count: the target category needs at least this many non-crowd
            instances in the image.
        max_count: ... and at most this many (None: no limit).
        categories: only for target categories with these names (None: all).
        description: singular texts of kind ``description``.
        description_plural: texts of kind ``description`` for several targets.
        phrase: singular texts of kind ``phrase`` (short noun phrases).
        phrase_plural: texts of kind ``phrase`` for several targets.
    """

    id: str = Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
    enabled: bool = True
    min_count: int = Field(default=1, ge=1)
    max_count: int | None = Field(default=None, ge=1)
    categories: list[str] | None = None
    description: list[str] = Field(default_factory=list)
    description_plural: list[str] = Field(default_factory=list)
    phrase: list[str] = Field(default_factory=list)
    phrase_plural: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_texts(self) -> "_TemplateBase":
        needs_anchor = getattr(self, "family", "") == "relation"
        if not (self.description or self.description_plural or self.phrase or self.phrase_plural):
            raise ValueError(f"template {self.id!r} has no texts; give description and/or phrase texts.")
        for key in ("description", "description_plural", "phrase", "phrase_plural"):
            plural = key.endswith("_plural")
            for text in getattr(self, key):
                try:
                    names = _placeholders(text)
                except ValueError as err:
                    raise ValueError(f"template {self.id!r} {key} text {text!r} is not a valid format string: {err}") from None
                bad = names - _ALLOWED
                if bad:
                    raise ValueError(f"template {self.id!r} {key} text {text!r} uses unknown placeholders {sorted(bad)}; allowed: {sorted(_ALLOWED)}.")
                need = "plural" if plural else "noun"
                if need not in names:
                    raise ValueError(f"template {self.id!r} {key} text {text!r} must contain {{{need}}}.")
                if needs_anchor != ("anchor" in names):
                    raise ValueError(
                        f"template {self.id!r} {key} text {text!r}: "
                        + ("relation texts must name the {anchor}." if needs_anchor else "only relation texts may use {anchor}.")
                    )
        if self.max_count is not None and self.max_count < self.min_count:
            raise ValueError(f"template {self.id!r}: max_count {self.max_count} is below min_count {self.min_count}.")
        return self


class AbsoluteTemplate(_TemplateBase):
    """Position in the image (thirds): ``left`` ... ``bottom_right``."""

    family: Literal["absolute"]
    region: Literal[ABSOLUTE_REGIONS]  # type: ignore[valid-type]


class OrdinalTemplate(_TemplateBase):
    """Rank along an axis among the category's instances (``rank`` 0 = the -most)."""

    family: Literal["ordinal"]
    side: Literal[ORDINAL_SIDES]  # type: ignore[valid-type]
    rank: int = Field(default=0, ge=0, le=9)

    @model_validator(mode="after")
    def _single(self) -> "OrdinalTemplate":
        if self.description_plural or self.phrase_plural:
            raise ValueError(f"template {self.id!r}: an ordinal picks one instance; remove its plural texts.")
        if self.min_count < self.rank + 2:
            raise ValueError(
                f"template {self.id!r}: rank {self.rank} needs min_count >= {self.rank + 2} "
                "(an ordinal compares the target with at least one more instance past it)."
            )
        return self


class SizeTemplate(_TemplateBase):
    """Largest / smallest visible mask area among the category's instances."""

    family: Literal["size"]
    order: Literal[SIZE_ORDERS]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _single(self) -> "SizeTemplate":
        if self.description_plural or self.phrase_plural:
            raise ValueError(f"template {self.id!r}: a size superlative picks one instance; remove its plural texts.")
        if self.min_count < 2:
            raise ValueError(f"template {self.id!r}: a size superlative needs min_count >= 2.")
        return self


class RelationTemplate(_TemplateBase):
    """Relation to an anchor: another category with exactly one instance."""

    family: Literal["relation"]
    relation: Literal[RELATIONS]  # type: ignore[valid-type]


Template = Annotated[AbsoluteTemplate | OrdinalTemplate | SizeTemplate | RelationTemplate, Field(discriminator="family")]


class NounForms(_Model):
    """How a category name is written: singular and plural."""

    singular: str = Field(min_length=1)
    plural: str = Field(min_length=1)


class CategoryTexts(_Model):
    """Texts of the category kinds.

    Attributes:
        single: ``category_single`` texts (use ``{noun}``).
        multi: ``category_multi`` texts (``{plural}``, or ``{noun}`` where
            the grammar wants it: "every {noun}").
    """

    single: list[str] = Field(min_length=1)
    multi: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "CategoryTexts":
        for key in ("single", "multi"):
            for text in getattr(self, key):
                names = _placeholders(text)
                if names - {"noun", "plural"} or not names:
                    raise ValueError(f"category.{key} text {text!r} must use {{noun}} or {{plural}} and nothing else.")
                if key == "single" and "plural" in names:
                    raise ValueError(f"category.single text {text!r} names one instance; use {{noun}}, not {{plural}}.")
        return self


class TemplateSet(_Model):
    """A whole templates file.

    Attributes:
        version: bumped whenever texts or semantics change; stored on samples.
        category: texts of ``category_single`` / ``category_multi``.
        no_target: texts of ``no_target`` samples (``{noun}`` or ``{plural}``);
            the same wording as positives, so a model cannot tell them apart by form.
        nouns: category name -> written forms, where the name is not what
            people say ("sports ball" -> "ball") or the plural is irregular
            beyond what ``inflect`` knows.
        templates: the descriptive templates.
    """

    version: int = Field(ge=1)
    category: CategoryTexts
    no_target: list[str] = Field(min_length=1)
    nouns: dict[str, NounForms] = Field(default_factory=dict)
    templates: list[Template] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "TemplateSet":
        ids = [t.id for t in self.templates]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"template ids must be unique; {dupes} appear more than once.")
        for text in self.no_target:
            names = _placeholders(text)
            if names - {"noun", "plural"} or not names:
                raise ValueError(f"no_target text {text!r} must use {{noun}} or {{plural}} and nothing else.")
        return self

    def enabled(self) -> list[Any]:
        """The enabled templates, in file order."""
        return [t for t in self.templates if t.enabled]


def _format_errors(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        parts = list(e["loc"])
        # pydantic puts the union's tag ("relation") after the list index; drop it.
        parts = [p for i, p in enumerate(parts) if not (i and isinstance(parts[i - 1], int) and p in _FAMILIES)]
        loc = ".".join(str(p) for p in parts)
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 100:
            shown = shown[:97] + "..."
        lines.append(f"  {loc or '<root>'} = {shown}: {e['msg']}")
    return f"invalid templates file {where}:\n" + "\n".join(lines) + "\nFix these keys in the templates YAML."


def parse_templates(data: Any, where: str = "<memory>") -> TemplateSet:
    """Validates a templates mapping.

    Raises:
        TemplateError: naming every bad key and value.
    """
    if not isinstance(data, dict):
        raise TemplateError(f"templates file {where} must hold a mapping at the top level, got {type(data).__name__}.")
    try:
        return TemplateSet.model_validate(data)
    except ValidationError as err:
        raise TemplateError(_format_errors(err, where)) from None


def load_templates(path: str | None = None) -> TemplateSet:
    """Loads and validates a templates YAML file.

    Args:
        path: a local path or fsspec URL; None loads the bundled
            ``configs/templates/expressions.yaml``.

    Returns:
        The validated template set.

    Raises:
        TemplateError: the file is missing, not YAML, or invalid.
    """
    if path is None:
        text = resources.files("orsgen.configs").joinpath("templates", DEFAULT_TEMPLATES).read_text(encoding="utf-8")
        where = f"(bundled) templates/{DEFAULT_TEMPLATES}"
    else:
        where = repr(str(path))
        try:
            with fsspec.open(str(path), "rt", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise TemplateError(
                f"templates file {where} does not exist; fix expressions.templates in the config "
                "or leave it out to use the bundled templates."
            ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TemplateError(f"templates file {where} is not valid YAML: {err}") from None
    return parse_templates(data, where)


# ---------------------------------------------------------------- noun forms


@functools.lru_cache(maxsize=1)
def _inflect_engine() -> Any:
    import inflect

    return inflect.engine()


@functools.lru_cache(maxsize=4096)
def _plural(name: str) -> str:
    # COCO's names come from a table of inflect's own answers: importing
    # inflect costs seconds of start-up that such a run need not pay.
    from orsgen.stages.expressions.plurals import KNOWN_PLURALS

    known = KNOWN_PLURALS.get(name)
    if known is not None:
        return known
    return str(_inflect_engine().plural_noun(name))


_PARENTHETICAL = re.compile(r"\s*\([^()]*\)\s*$")


@functools.lru_cache(maxsize=4096)
def display_name(name: str) -> str:
    """How a category name is written in text: LVIS-style ``_`` become spaces, a trailing ``(...)`` goes.

    ``glass_(drink_container)`` -> ``glass``; COCO names are unchanged.
    Kept per name (every image's generators and coverage checks ask again).
    """
    text = _PARENTHETICAL.sub("", name.replace("_", " "))
    return " ".join(text.split()) or name


def noun_forms(name: str, overrides: dict[str, NounForms] | None = None) -> NounForms:
    """Singular and plural of a category name.

    Args:
        name: the category name from the vocabulary (e.g. ``person``, or an
            LVIS-style ``dining_table``).
        overrides: the templates file's ``nouns`` table.

    Returns:
        The forms; ``inflect`` writes the plural ("person" -> "people",
        "knife" -> "knives") unless the table says otherwise. LVIS-style
        names are written as ``display_name`` gives them.
    """
    if overrides and name in overrides:
        return overrides[name]
    return _written_forms(name)


@functools.lru_cache(maxsize=4096)
def _written_forms(name: str) -> NounForms:
    # Kept per name: NounForms is frozen, and its validation costs more than
    # the lookup (each image's generators ask for every category again).
    written = display_name(name)
    return NounForms(singular=written, plural=_plural(written))
