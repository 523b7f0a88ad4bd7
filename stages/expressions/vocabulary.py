"""Which written words cover which categories (``configs/vocabulary/coverage.yaml``).

A word can name more than the category it was written for: COCO's "dining
table" is written "table", and "table" also names the coffee table in plain
view. Two rules read this module:

* a ``no_target`` negative never names a word that covers a category present
  in the image, nor a category that a present category's word covers
  ("dining table" is no negative next to a generic "table" either);
* a category sample or description never names its category with a word that
  also covers another category present in the image ("the table" with a
  dining table and a coffee table), and an anchor is never named that way.

A word covers a category when (see ``covers``): it is written the same way
(singular or plural); the file lists the category under the word; the word
ends the category's name ("ball" covers "tennis ball"); or the word is the
category's supercategory ("animal" covers "dog"). Names are normalised before
any comparison, so COCO names and LVIS-style names ("dining_table",
"glass_(drink_container)") both work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from collections.abc import Sequence
from typing import Any

import fsspec
import yaml

from orsgen.stages.expressions.templates import NounForms, display_name, noun_forms

DEFAULT_VOCABULARY = "coverage.yaml"
_MAX_BYTES = 4 * 1024 * 1024  # a vocabulary file is a few KB; refuse anything huge before parsing it


class VocabularyError(ValueError):
    """The vocabulary file is missing or invalid; the message names the key."""


def normalize(name: str) -> str:
    """A category name or word as compared: lower case, ``_`` as spaces, no trailing ``(...)``."""
    return display_name(name).lower()


@dataclass(frozen=True)
class Coverage:
    """The word -> covered categories table, with the implicit rules applied on top.

    Attributes:
        version: the file's version (stored on samples).
        table: normalised word -> normalised names of the categories it covers.
    """

    version: int
    table: dict[str, frozenset[str]]
    _words: dict[tuple[str, NounForms | None], frozenset[str]] = field(default_factory=dict, compare=False, repr=False)
    #: ``suffixes`` by the same key as ``_words`` (every image's negatives ask for each vocabulary category).
    _suffixes: dict[tuple[str, NounForms | None], frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def words(self, name: str, nouns: dict[str, NounForms] | None = None) -> frozenset[str]:
        """The written forms of a category: normalised name, singular and plural (lower case)."""
        key = (name, nouns.get(name) if nouns else None)
        got = self._words.get(key)
        if got is None:
            f = noun_forms(name, nouns)
            got = frozenset({normalize(name), f.singular.lower(), f.plural.lower()})
            self._words[key] = got
        return got

    def word_covers(self, words: frozenset[str], name: str, supercategory: str = "", nouns: dict[str, NounForms] | None = None) -> bool:
        """Whether one of ``words`` names category ``name`` (the rules of the module docstring).

        Set operations on cached sets (every image asks about each pair of its
        categories): a word ends one of the category's forms after a space or
        a hyphen exactly when it is one of ``suffixes`` (the tails after each
        space or hyphen).
        """
        if not isinstance(words, (set, frozenset)):
            words = frozenset(words)
        target = self.words(name, nouns)
        if not words.isdisjoint(target):
            return True  # written the same way
        sup = normalize(supercategory) if supercategory else ""
        if sup and sup in words:
            return True  # the word is the category's supercategory
        if not words.isdisjoint(self.suffixes(name, nouns)):
            return True  # the word ends the category's name ("ball" -> "tennis ball")
        table = self.table
        for w in words:
            listed = table.get(w)
            if listed and not listed.isdisjoint(target):
                return True  # the file lists the category under the word
        return False

    def suffixes(self, name: str, nouns: dict[str, NounForms] | None = None) -> frozenset[str]:
        """Every proper tail of the category's written forms after a space or hyphen ("coffee table" -> "table")."""
        key = (name, nouns.get(name) if nouns else None)
        got = self._suffixes.get(key)
        if got is None:
            got = frozenset(t[i + 1 :] for t in self.words(name, nouns) for i, ch in enumerate(t) if ch in " -")
            self._suffixes[key] = got
        return got

    def index(self, present: Sequence[tuple[str, str]], nouns: dict[str, NounForms] | None = None) -> "PresentIndex":
        """The present categories of one image, indexed for ``PresentIndex.touches``."""
        words: set[str] = set()
        tails: set[str] = set()
        supers: set[str] = set()
        for name, sup in present:
            words |= self.words(name, nouns)
            tails |= self.suffixes(name, nouns)
            if sup:
                supers.add(normalize(sup))
        listed: set[str] = set()
        for w in words:
            listed |= self.table.get(w, frozenset())
        return PresentIndex(self, nouns, frozenset(words), frozenset(tails), frozenset(supers), frozenset(listed))

    def related(
        self,
        a: tuple[str, str],
        b: tuple[str, str],
        nouns: dict[str, NounForms] | None = None,
    ) -> bool:
        """Whether either category's words cover the other (``(name, supercategory)`` pairs)."""
        return self.word_covers(self.words(a[0], nouns), b[0], b[1], nouns) or self.word_covers(
            self.words(b[0], nouns), a[0], a[1], nouns
        )


def parse_vocabulary(data: Any, where: str = "<memory>") -> Coverage:
    """Validates a vocabulary mapping (``version`` and ``covers``).

    Raises:
        VocabularyError: naming the bad key and what to write instead.
    """
    if not isinstance(data, dict):
        raise VocabularyError(f"vocabulary file {where} must hold a mapping with keys version and covers.")
    unknown = sorted(set(data) - {"version", "covers"})
    if unknown:
        raise VocabularyError(f"vocabulary file {where} has unknown keys {unknown}; only version and covers are allowed.")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise VocabularyError(f"vocabulary file {where}: version must be an integer >= 1, got {version!r}.")
    covers = data.get("covers")
    if not isinstance(covers, dict):
        raise VocabularyError(f"vocabulary file {where}: covers must map each word to a list of category names.")
    table: dict[str, frozenset[str]] = {}
    for word, names in covers.items():
        if not isinstance(word, str) or not word.strip():
            raise VocabularyError(f"vocabulary file {where}: covers key {word!r} must be a non-empty string.")
        if names is None:
            names = []
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise VocabularyError(
                f"vocabulary file {where}: covers.{word} must be a list of category names, got {names!r}."
            )
        key = normalize(word)
        table[key] = table.get(key, frozenset()) | frozenset(normalize(n) for n in names)
    return Coverage(version=version, table=table)


@functools.lru_cache(maxsize=8)
def load_vocabulary(path: str | None = None) -> Coverage:
    """Loads (once per process) and validates a vocabulary file.

    Args:
        path: a local path or fsspec URL; None loads the bundled
            ``configs/vocabulary/coverage.yaml``.

    Raises:
        VocabularyError: the file is missing, too large, not YAML or invalid.
    """
    if path is None:
        text = resources.files("orsgen.configs").joinpath("vocabulary", DEFAULT_VOCABULARY).read_text(encoding="utf-8")
        where = f"(bundled) vocabulary/{DEFAULT_VOCABULARY}"
    else:
        where = repr(str(path))
        try:
            with fsspec.open(str(path), "rb") as f:
                raw = f.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            raise VocabularyError(
                f"vocabulary file {where} does not exist; fix expressions.vocabulary in the config "
                "or leave it out to use the bundled one."
            ) from None
        if len(raw) > _MAX_BYTES:
            raise VocabularyError(f"vocabulary file {where} is over {_MAX_BYTES} bytes; a word table is a few KB.")
        text = raw.decode("utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise VocabularyError(f"vocabulary file {where} is not valid YAML: {err}") from None
    return parse_vocabulary(data, where)



@dataclass(frozen=True)
class PresentIndex:
    """The categories present in one image, precomputed so that a vocabulary of
    a thousand categories is checked in a few set operations each.

    ``touches(name, sup)`` equals ``any(coverage.related((name, sup), p) for p in present)``.
    """

    coverage: Coverage
    nouns: dict[str, NounForms] | None
    words: frozenset[str]
    tails: frozenset[str]
    supers: frozenset[str]
    listed: frozenset[str]

    def touches(self, name: str, supercategory: str = "") -> bool:
        """Whether category ``name`` covers, or is covered by, a present category."""
        cov = self.coverage
        mine = cov.words(name, self.nouns)
        if mine & self.words or mine & self.listed:
            return True  # same written form, or a present word lists it
        if mine & self.supers or mine & self.tails:
            return True  # it names a present category's supercategory or head noun
        if any(not self.words.isdisjoint(cov.table.get(w, ())) for w in mine):
            return True  # its own table entry lists a present form
        if supercategory and normalize(supercategory) in self.words:
            return True  # a present word is its supercategory
        return not self.words.isdisjoint(cov.suffixes(name, self.nouns))  # a present word is its head noun
