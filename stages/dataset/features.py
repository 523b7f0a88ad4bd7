"""HF ``datasets`` features of orsgen's WebDataset shards."""

from __future__ import annotations

from typing import TYPE_CHECKING


from orsgen.schemas.arrow import EXAMPLE_SCHEMA

if TYPE_CHECKING:
    import datasets


def webdataset_features() -> "datasets.Features":
    """HF ``datasets`` features of the WebDataset shards.

    HF's webdataset loader infers column types from the first 5 samples of a
    split; a field that is null or empty in all of them (SA-1B's
    ``category_id``, ``refs`` of images without refs) then fails to cast the
    first later sample that has a value. Pass these features to
    ``load_dataset("webdataset", data_files=..., features=webdataset_features())``
    to give every column its ``EXAMPLE_SCHEMA`` type instead.

    Returns:
        A ``datasets.Features`` with ``__key__``, ``__url__``, ``jpg`` (an
        ``Image``) and ``json`` (every ``EXAMPLE_SCHEMA`` column but ``image``).
    """
    import datasets  # only readers of the output need it

    json_schema = EXAMPLE_SCHEMA.remove(EXAMPLE_SCHEMA.get_field_index("image"))
    return datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            "jpg": datasets.Image(),
            "json": datasets.Features.from_arrow_schema(json_schema),
        }
    )
