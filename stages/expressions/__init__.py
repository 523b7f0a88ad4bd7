"""Referring expressions from annotations: categories, descriptions, negatives.

Modules, in the order the stage uses them:

* ``templates``: the templates YAML (data) and its pydantic models; noun forms.
* ``vocabulary``: which written words cover which categories (data file
  ``configs/vocabulary/coverage.yaml``), for negatives and uniqueness.
* ``geometry``: exact semantics of the descriptive families (RLE-moment
  centroids, boxes, areas) with margins.
* ``context``: one image as the generators see it; seeded choices.
* ``categories``: ``category_single`` / ``category_multi``.
* ``descriptions``: ``description`` / ``phrase`` with verified uniqueness.
* ``negatives``: ``no_target`` (hard negatives first).
* ``balance``: merge identical texts, caps, negative ratio.
* ``stage``: the pure stage core and its pipeline adapter.
"""

from orsgen.stages.expressions.stage import add_expressions, expressions_stage, generate_candidates
from orsgen.stages.expressions.templates import TemplateSet, load_templates

__all__ = ["TemplateSet", "add_expressions", "expressions_stage", "generate_candidates", "load_templates"]
