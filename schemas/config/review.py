"""Config of the screening stage: human review decisions applied in the build."""

from __future__ import annotations

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, field_validator


class ReviewConfig(ConfigModel):
    """Human screening (``orsgen review``) applied to the samples of a build.

    Attributes:
        decisions: the decisions a review wrote, ``DIR/_review/decisions.parquet``
            (a folder of part files, or one Parquet file; a local path or an
            fsspec URL). A sample rejected there becomes a sample-level reject
            ``human_rejected`` carrying the reviewer's reason; an accepted
            sample is written with ``screened: true``. When one sample was
            judged more than once, the latest verdict wins.
        require_screened_for: splits that may only hold screened samples;
            their other samples (never judged, or skipped) are held out as
            sample-level rejects ``unscreened`` and counted in the manifest.
    """

    decisions: str | None = None
    require_screened_for: list[str] = Field(default_factory=list)

    @field_validator("require_screened_for")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or not (name.isascii() and name.replace("_", "").isalnum()):
                raise ValueError(f"split name {name!r} must use only letters, digits and '_'.")
        return sorted(set(v))

    @property
    def active(self) -> bool:
        """True when the build has anything to apply."""
        return bool(self.decisions or self.require_screened_for)
