"""What every expression generator reads about one image, and what it returns.

``ImageContext`` is built once per image from its instances: geometry of every
instance (``geometry.Geom``), non-crowd instances grouped by category, the
categories with a crowd annotation, the categories present at all, and which
instances will survive region selection (only those can be targets).
Generators return ``Candidate`` records; ``balance`` dedups and caps them and
``stage`` turns the survivors into ``Sample`` records.

Randomness is a salted hash of ``(seed, image id, what is being decided)``
rather than a stream of draws, so a decision does not change when another
template or kind is switched on or off, and no worker or bundle order can
change it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from orsgen.schemas.records import Instance, Presence, slots_constructor
from orsgen.stages.expressions.geometry import Geom, Margins, instance_geom, rle_moments_many
from orsgen.stages.splits import sha256_unit

if TYPE_CHECKING:
    from orsgen.stages.expressions.vocabulary import Coverage

T = TypeVar("T")



@dataclass(frozen=True, slots=True)
class Candidate:
    """A proposed sample before deduplication and caps.

    Attributes:
        kind: an ``ExpressionKind`` value.
        expression: the text.
        target_ids: sorted instance ids of the targets (empty for no_target).
        template: the template id (``category.single``, ``ordinal.leftmost``...).
        metadata: provenance stored on the sample (family, parameters, anchor).
    """

    kind: str
    expression: str
    target_ids: tuple[str, ...]
    template: str
    metadata: dict[str, Any] = field(default_factory=dict)


#: ``make_candidate(kind, expression, target_ids, template, metadata)`` equals
#: ``Candidate(...)`` of the same fields: the slots set directly, without the
#: frozen dataclass's ``object.__setattr__`` call per field (about half the
#: cost; the generators make a hundred candidates per image).
make_candidate = slots_constructor(Candidate)


@dataclass(frozen=True)
class ImageContext:
    """One image as the generators see it.

    Attributes:
        image_id: the image id (seeds every decision with ``seed``).
        width: width in pixels.
        height: height in pixels.
        geoms: instance id -> geometry, for every instance (crowd included).
        pools: category name -> its non-crowd instances, sorted by id.
        crowd_categories: names of categories with a crowd annotation.
        rejected_categories: names of categories with an annotation that
            ingest rejected (``ImageExample.presence``): the object is there,
            its mask is not, so the category's extent is unknown.
        present_names: names of every category annotated in the image,
            rejected annotations included.
        present_categories: ``(name, supercategory)`` of every present category.
        present_ids: ids of every category annotated in the image.
        present_supercategories: supercategories of the present categories.
        kept_ids: instances that survive region selection (possible targets).
        margins: the semantics' margins for this image.
        seed: the config seed.
        coverage: which words cover which categories (None: a word covers
            only its own category).
        nouns: the templates' written forms (for ``coverage``).
    """

    image_id: str
    width: int
    height: int
    geoms: dict[str, Geom]
    pools: dict[str, list[Geom]]
    crowd_categories: frozenset[str]
    present_names: frozenset[str]
    present_ids: frozenset[int]
    present_supercategories: frozenset[str]
    kept_ids: frozenset[str]
    margins: Margins
    seed: int
    rejected_categories: frozenset[str] = frozenset()
    present_categories: tuple[tuple[str, str], ...] = ()
    coverage: Coverage | None = None
    nouns: dict[str, Any] | None = None
    #: What ``unit`` hashes before its parts: ``hash_unit``'s salt, its
    #: separator and the image id, joined once per image (``__post_init__``).
    _unit_prefix: str = field(default="", init=False, repr=False, compare=False)
    #: ``covers_another`` answers by category name (the category and the
    #: descriptive generators, and every relation anchor, ask again).
    _covers: dict[str, str | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # unit(*parts) == hash_unit("\x00".join([image_id, *parts]), f"expressions:{seed}"),
        # and hash_unit hashes f"{salt}\x00{text}": everything before the parts is fixed.
        object.__setattr__(self, "_unit_prefix", f"expressions:{self.seed}\x00{self.image_id}")

    @classmethod
    def build(
        cls,
        image_id: str,
        width: int,
        height: int,
        instances: Sequence[Instance],
        margins: Margins,
        *,
        seed: int,
        kept_ids: Iterable[str] | None = None,
        presence: Sequence[Presence] = (),
        coverage: Coverage | None = None,
        nouns: dict[str, Any] | None = None,
    ) -> "ImageContext":
        """Builds the context of one image.

        Args:
            image_id: the image id.
            width: width in pixels.
            height: height in pixels.
            instances: every annotated instance of the image (before region
                selection: a dropped instance is still visible in the image,
                so it still counts for uniqueness and category extent).
            margins: the semantics' margins for this image.
            seed: the config seed.
            kept_ids: instances that region selection keeps; None keeps all.
            presence: annotations ingest rejected whose category is known.
            coverage: the word coverage table (see ``vocabulary``).
            nouns: the templates' written forms.
        """
        geoms: dict[str, Geom] = {}
        pools: dict[str, list[Geom]] = defaultdict(list)
        crowd: set[str] = set()
        names: set[str] = set()
        ids: set[int] = set()
        supers: set[str] = set()
        cats: dict[str, str] = {}
        ordered = sorted(instances, key=lambda i: i.instance_id)
        for inst, moments in zip(ordered, rle_moments_many([i.rle for i in ordered])):
            g = instance_geom(inst, moments)
            geoms[inst.instance_id] = g
            if inst.category_id is not None:
                ids.add(int(inst.category_id))
            if inst.supercategory:
                supers.add(inst.supercategory)
            name = inst.category_name
            if not name:
                continue  # class-agnostic region: no words for it
            names.add(name)
            cats.setdefault(name, inst.supercategory or "")
            if inst.iscrowd:
                crowd.add(name)
            else:
                pools[name].append(g)
        rejected: set[str] = set()
        for p in presence:
            # A rejected annotation is still an object in the image: present
            # for negatives, and its category's extent is unknown.
            ids.add(int(p.category_id))
            if p.supercategory:
                supers.add(p.supercategory)
            if p.category_name:
                names.add(p.category_name)
                rejected.add(p.category_name)
                cats.setdefault(p.category_name, p.supercategory or "")
        return cls(
            image_id=image_id,
            width=int(width),
            height=int(height),
            geoms=geoms,
            pools=dict(pools),
            crowd_categories=frozenset(crowd),
            present_names=frozenset(names),
            present_ids=frozenset(ids),
            present_supercategories=frozenset(supers),
            kept_ids=frozenset(geoms if kept_ids is None else kept_ids),
            margins=margins,
            seed=int(seed),
            rejected_categories=frozenset(rejected),
            present_categories=tuple(sorted(cats.items())),
            coverage=coverage,
            nouns=nouns,
        )

    def unknown_extent(self, name: str) -> bool:
        """The category has a crowd or a rejected annotation: its instances are not all known."""
        return name in self.crowd_categories or name in self.rejected_categories

    def covers_another(self, name: str) -> str | None:
        """Another present category that ``name``'s written word also covers, or None.

        "the table" (COCO's dining table) is ambiguous in an image with a
        coffee table too; such a word is never used for a category sample,
        a description or an anchor.
        """
        if self.coverage is None:
            return None
        if name in self._covers:
            return self._covers[name]
        found = None
        words = self.coverage.words(name, self.nouns)
        for other, sup in self.present_categories:
            if other != name and self.coverage.word_covers(words, other, sup, self.nouns):
                found = other
                break
        self._covers[name] = found
        return found

    def unit(self, *parts: Any) -> float:
        """A uniform number in [0, 1) fixed by the seed, the image and ``parts``.

        Equal to ``hash_unit("\x00".join([image_id, *map(str, parts)]), f"expressions:{seed}")``
        (tests/test_throughput.py), with the fixed head of the hashed text joined once per image.
        """
        return sha256_unit("\x00".join([self._unit_prefix, *map(str, parts)]))

    def pick(self, options: Sequence[T], *parts: Any) -> T:
        """One of ``options``, chosen by ``unit(*parts)``."""
        n = len(options)
        if n == 1:
            return options[0]  # what any unit picks: the number is not needed
        if not n:
            raise ValueError("pick() needs at least one option.")
        return options[min(int(self.unit(*parts) * n), n - 1)]

    def shuffled(self, items: Iterable[T], key: Any) -> list[T]:
        """``items`` in a seeded order; ``key(item)`` names each item stably (``shuffled_named`` of the names)."""
        items = list(items)
        return self.shuffled_named(items, [str(key(it)) for it in items])

    def shuffled_named(self, items: Sequence[T], names: Sequence[str]) -> list[T]:
        """``items`` in a seeded order, ``names[i]`` naming ``items[i]`` (made by the caller, no key calls).

        Each item's place is ``(unit("order", name), name)``, ties in the
        given order (the index is the last element of the sort key).
        """
        head = f"{self._unit_prefix}\x00order\x00"  # unit("order", name), the fixed head joined once
        units = [sha256_unit(head + name) for name in names]
        at = dict(zip(units, range(len(units))))
        if len(at) == len(units):
            # No two units are equal, so the unit alone decides every comparison of
            # the (unit, name, index) keys: the floats sorted give the same order.
            return [items[at[u]] for u in sorted(units)]
        return [items[i] for _, _, i in sorted(zip(units, names, range(len(names))))]
