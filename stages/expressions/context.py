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
from typing import Any, TypeVar

from orsgen.schemas.records import Instance
from orsgen.stages.expressions.geometry import Geom, Margins, instance_geom
from orsgen.stages.splits import hash_unit

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
        present_names: names of every category annotated in the image.
        present_ids: ids of every category annotated in the image.
        present_supercategories: supercategories of the present categories.
        kept_ids: instances that survive region selection (possible targets).
        margins: the semantics' margins for this image.
        seed: the config seed.
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
        """
        geoms: dict[str, Geom] = {}
        pools: dict[str, list[Geom]] = defaultdict(list)
        crowd: set[str] = set()
        names: set[str] = set()
        ids: set[int] = set()
        supers: set[str] = set()
        for inst in sorted(instances, key=lambda i: i.instance_id):
            g = instance_geom(inst)
            geoms[inst.instance_id] = g
            if inst.category_id is not None:
                ids.add(int(inst.category_id))
            if inst.supercategory:
                supers.add(inst.supercategory)
            name = inst.category_name
            if not name:
                continue  # class-agnostic region: no words for it
            names.add(name)
            if inst.iscrowd:
                crowd.add(name)
            else:
                pools[name].append(g)
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
        )

    def unit(self, *parts: Any) -> float:
        """A uniform number in [0, 1) fixed by the seed, the image and ``parts``."""
        return hash_unit("\x00".join([self.image_id, *(str(p) for p in parts)]), f"expressions:{self.seed}")

    def pick(self, options: Sequence[T], *parts: Any) -> T:
        """One of ``options``, chosen by ``unit(*parts)``."""
        if not options:
            raise ValueError("pick() needs at least one option.")
        return options[min(int(self.unit(*parts) * len(options)), len(options) - 1)]

    def shuffled(self, items: Iterable[T], key: Any) -> list[T]:
        """``items`` in a seeded order; ``key(item)`` names each item stably."""
        return sorted(items, key=lambda it: (self.unit("order", key(it)), str(key(it))))
