"""Versioned prompt templates and the box conventions of grounding VLMs.

Templates are data: one YAML file per template in ``configs/prompts/``
(``cors_ground``, ``cors_verify``, ``ders_describe``, ``reground``), each with
an ``id`` and a ``version``. ``id@version`` is stored on every request
(``VlmRequest.prompt_version``) and in the response cache key, so editing a
template's text without bumping its version still invalidates cached answers
(the text is in the key too), while the version names what produced a sample.

Template text uses ``string.Template`` placeholders (``$label``,
``${box_format}``) so that the JSON examples in the prompts need no escaping.
``$box_format`` is filled from the model's box convention:

* ``absolute`` (Qwen2.5-VL): ``[x1, y1, x2, y2]`` in pixels of the image as the
  model sees it, i.e. after the client's max-side resize and the processor's
  ``smart_resize`` to multiples of 28;
* ``relative_1000`` (Qwen3-VL, Qwen2-VL): ``[x1, y1, x2, y2]`` scaled to 0..1000.

``to_model_box`` / ``from_model_box`` convert between source-image pixels and
a model's convention; ``model_input_size`` computes the image size the model
sees.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orsgen.stages.common.qwen_resize import smart_resize as _smart_resize
from orsgen.stages.caption.types import SamplingParams, VlmRequest, VlmTask

#: The bundled templates.
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "prompts"


class BoxConvention(StrEnum):
    """How a model writes box coordinates."""

    ABSOLUTE = "absolute"  # Qwen2.5-VL: pixels of the resized model input
    RELATIVE_1000 = "relative_1000"  # Qwen3-VL / Qwen2-VL: 0..1000 of width and height


#: What ``$box_format`` says for each convention (a template may override it).
BOX_FORMAT_TEXT: dict[str, str] = {
    BoxConvention.ABSOLUTE: (
        "Box coordinates are [x1, y1, x2, y2]: absolute pixel positions of the top-left and "
        "bottom-right corners in the image as you see it."
    ),
    BoxConvention.RELATIVE_1000: (
        "Box coordinates are [x1, y1, x2, y2]: the top-left and bottom-right corners, each "
        "scaled to 0-1000 of the image width and height."
    ),
}


class PromptError(ValueError):
    """A template file is invalid, or a render is missing a field."""


class PromptTemplate(BaseModel):
    """One versioned template.

    Attributes:
        id: template id, e.g. ``ders_describe``.
        version: version tag, e.g. ``v1``; bump it when the text changes.
        task: the ``VlmTask`` it serves.
        description: what it asks, for humans.
        images: what each attached image must be, in order (documentation
            for the stage that builds requests, e.g. ``[original, overlay]``).
        system: system prompt (``string.Template`` syntax).
        user: user prompt (``string.Template`` syntax).
        defaults: values of optional placeholders.
        json_schema: JSON Schema of the answer, sent as ``response_format``
            where the server supports it (None: unconstrained).
        box_formats: per-convention ``$box_format`` text overriding
            ``BOX_FORMAT_TEXT``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    version: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    task: VlmTask
    description: str = ""
    images: list[str] = Field(default_factory=list)
    system: str = ""
    user: str = Field(min_length=1)
    defaults: dict[str, str] = Field(default_factory=dict)
    json_schema: dict[str, Any] | None = None
    box_formats: dict[BoxConvention, str] = Field(default_factory=dict)

    @field_validator("system", "user")
    @classmethod
    def _valid_template(cls, v: str) -> str:
        t = string.Template(v)
        if not t.is_valid():
            raise ValueError("has an invalid placeholder; write $name or ${name}, and $$ for a literal $.")
        return v

    @property
    def ref(self) -> str:
        """``id@version``, stored as ``VlmRequest.prompt_version``."""
        return f"{self.id}@{self.version}"

    @property
    def fields(self) -> set[str]:
        """Every placeholder of the system and user text."""
        return set(string.Template(self.system).get_identifiers()) | set(string.Template(self.user).get_identifiers())

    @property
    def required_fields(self) -> set[str]:
        """Placeholders without a default (``box_format`` is always provided)."""
        return self.fields - set(self.defaults) - {"box_format"}

    def json_schema_text(self) -> str:
        """The schema as canonical JSON text ("" when there is none)."""
        if self.json_schema is None:
            return ""
        return json.dumps(self.json_schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class PromptSet(BaseModel):
    """One template per task, loaded from files.

    Attributes:
        templates: task -> template.
        source: where they were loaded from (for messages).
    """

    model_config = ConfigDict(frozen=True)

    templates: dict[VlmTask, PromptTemplate]
    source: str = ""

    @model_validator(mode="after")
    def _task_keys(self) -> "PromptSet":
        for task, tpl in self.templates.items():
            if tpl.task != task:
                raise ValueError(f"template {tpl.ref} serves task {tpl.task.value}, not {task.value}.")
        return self

    def __getitem__(self, task: VlmTask | str) -> PromptTemplate:
        try:
            return self.templates[VlmTask(task)]
        except (KeyError, ValueError):
            have = sorted(t.value for t in self.templates)
            raise PromptError(f"no prompt template for task {task!r} in {self.source}; it has {have}.") from None

    def version_of(self, task: VlmTask | str) -> str:
        """``id@version`` of the template serving ``task``."""
        return self[task].ref


def load_prompts(path: str | Path | None = None) -> PromptSet:
    """Loads and validates prompt templates.

    Args:
        path: a YAML file holding one template (or a list of templates), or a
            folder of such files (``*.yaml``, sorted). None loads the bundled
            ``configs/prompts/``. A folder must not hold two templates for one
            task.

    Returns:
        The validated set.

    Raises:
        PromptError: a file is missing, not YAML, invalid (the message names
            the file, the key and the value), or two files serve one task.
    """
    p = Path(path) if path is not None else DEFAULT_PROMPTS_DIR
    if p.is_dir():
        files = sorted(p.glob("*.yaml"))
        if not files:
            raise PromptError(f"prompt folder {str(p)!r} holds no *.yaml templates.")
    elif p.is_file():
        files = [p]
    else:
        raise PromptError(f"prompt path {str(p)!r} does not exist; pass a template file or folder (see configs/prompts/).")
    templates: dict[VlmTask, PromptTemplate] = {}
    origin: dict[VlmTask, Path] = {}
    for f in files:
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise PromptError(f"prompt file {str(f)!r} is not valid YAML: {err}") from None
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict):
                raise PromptError(f"prompt file {str(f)!r} must hold a mapping (or a list of mappings) per template.")
            try:
                tpl = PromptTemplate.model_validate(item)
            except ValidationError as err:
                lines = [
                    f"  {'.'.join(str(x) for x in e['loc']) or '<root>'} = {str(e.get('input'))[:80]!r}: {e['msg']}"
                    for e in err.errors()
                ]
                raise PromptError(f"invalid prompt template in {str(f)!r}:\n" + "\n".join(lines)) from None
            if tpl.task in templates:
                raise PromptError(
                    f"two templates serve task {tpl.task.value}: {templates[tpl.task].ref} in {str(origin[tpl.task])!r} "
                    f"and {tpl.ref} in {str(f)!r}; keep one per task in a folder."
                )
            templates[tpl.task] = tpl
            origin[tpl.task] = f
    return PromptSet(templates=templates, source=str(p))


def render(
    prompt_set: PromptSet,
    task: VlmTask | str,
    *,
    box_convention: BoxConvention | str = BoxConvention.ABSOLUTE,
    **fields: Any,
) -> tuple[str, str, str]:
    """Fills one template.

    Args:
        prompt_set: the loaded templates.
        task: which template.
        box_convention: fills ``$box_format``.
        **fields: placeholder values (``str()`` is applied; boxes should be
            given already formatted with ``format_box``).

    Returns:
        ``(system, user, json_schema_text)``; the schema text is "" when the
        template has none.

    Raises:
        PromptError: a required placeholder has no value, or an unknown one
            was given (a typo would otherwise be silently ignored).
    """
    tpl = prompt_set[task]
    conv = BoxConvention(box_convention)
    unknown = set(fields) - tpl.fields
    if unknown:
        raise PromptError(f"template {tpl.ref} has no placeholder(s) {sorted(unknown)}; it has {sorted(tpl.fields)}.")
    missing = tpl.required_fields - set(fields)
    if missing:
        raise PromptError(f"template {tpl.ref} needs field(s) {sorted(missing)}; pass them to render().")
    values = {**tpl.defaults, **{k: str(v) for k, v in fields.items()}}
    values["box_format"] = tpl.box_formats.get(conv, BOX_FORMAT_TEXT[conv])
    system = string.Template(tpl.system).substitute(values).strip()
    user = string.Template(tpl.user).substitute(values).strip()
    return system, user, tpl.json_schema_text()


def make_request(
    prompt_set: PromptSet,
    task: VlmTask | str,
    *,
    request_id: str,
    images: Sequence[bytes],
    region: str = "",
    sampling: SamplingParams = SamplingParams(),
    metadata: Mapping[str, Any] | None = None,
    box_convention: BoxConvention | str = BoxConvention.ABSOLUTE,
    **fields: Any,
) -> VlmRequest:
    """Renders a template into a ``VlmRequest`` (image sha256s computed here).

    Args:
        prompt_set: the loaded templates.
        task: which template.
        request_id: stable id, unique in the run.
        images: encoded images in the order the template's ``images`` lists.
        region: region / instance id the request is about (cache key).
        sampling: generation parameters (cache key).
        metadata: opaque context for the stage (never sent).
        box_convention: fills ``$box_format``.
        **fields: placeholder values.

    Returns:
        The request.
    """
    system, user, schema = render(prompt_set, task, box_convention=box_convention, **fields)
    return VlmRequest(
        request_id=request_id,
        task=VlmTask(task).value,
        prompt_version=prompt_set.version_of(task),
        system=system,
        user=user,
        images=tuple(images),
        image_sha256=tuple(hashlib.sha256(b).hexdigest() for b in images),
        region=region,
        json_schema=schema,
        sampling=sampling,
        metadata=dict(metadata or {}),
    )


# ------------------------------------------------------------------ image geometry

#: Qwen2-VL / Qwen2.5-VL processors: 14 px patches merged 2x2.
QWEN25_FACTOR_PX = 28
#: Qwen3-VL processors: 16 px patches merged 2x2.
QWEN3_FACTOR_PX = 32
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12_845_056  # max_pixels in the released Qwen2.5-VL preprocessor configs


def fit_max_side(width: int, height: int, max_side_px: int | None) -> tuple[int, int]:
    """Size after the client's resize to at most ``max_side_px`` (never upscales).

    Both backends resize with this rule before sending, so the size the model
    sees is reproducible from the source size.

    Args:
        width: source width in px.
        height: source height in px.
        max_side_px: longest side allowed (None or 0: no resize).

    Returns:
        ``(width, height)`` in px, each at least 1.
    """
    if not max_side_px or max(width, height) <= max_side_px:
        return int(width), int(height)
    scale = max_side_px / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def smart_resize(
    height: int,
    width: int,
    factor: int = QWEN25_FACTOR_PX,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """The Qwen-VL processors' resize with the captioner's defaults.

    See ``stages.common.qwen_resize.smart_resize``; kept importable here so that box
    conversion needs no transformers import.

    Returns:
        ``(height, width)`` in px.
    """
    return _smart_resize(height, width, factor, min_pixels, max_pixels, max_aspect_ratio=None)


def model_input_size(
    width: int,
    height: int,
    *,
    max_side_px: int | None,
    factor_px: int = QWEN25_FACTOR_PX,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Size of the image as the model sees it: client resize, then ``smart_resize``.

    Args:
        width: source width in px.
        height: source height in px.
        max_side_px: the backend's ``max_image_side_px``.
        factor_px: the processor's patch factor (28 for Qwen2.5-VL, 32 for Qwen3-VL).
        min_pixels: the processor's ``min_pixels``.
        max_pixels: the processor's ``max_pixels`` (the server's setting).

    Returns:
        ``(width, height)`` in px.
    """
    w, h = fit_max_side(width, height, max_side_px)
    hh, ww = smart_resize(h, w, factor=factor_px, min_pixels=min_pixels, max_pixels=max_pixels)
    return ww, hh


Box = tuple[float, float, float, float]


def to_model_box(
    box_xyxy: Sequence[float],
    *,
    image_wh: tuple[int, int],
    convention: BoxConvention | str,
    model_wh: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """Converts a source-image pixel box into a model's box convention.

    Args:
        box_xyxy: ``[x0, y0, x1, y1]`` in source pixels.
        image_wh: source ``(width, height)`` in px.
        convention: the model's convention.
        model_wh: ``(width, height)`` the model sees (``model_input_size``);
            required for ``absolute``.

    Returns:
        Integer ``[x1, y1, x2, y2]`` as the model writes boxes.
    """
    _scales(image_wh, convention, model_wh)
    w, h = image_wh
    mw, mh = (1000, 1000) if BoxConvention(convention) is BoxConvention.RELATIVE_1000 else model_wh  # type: ignore[misc]
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return round(x0 * mw / w), round(y0 * mh / h), round(x1 * mw / w), round(y1 * mh / h)


def from_model_box(
    box: Sequence[float],
    *,
    image_wh: tuple[int, int],
    convention: BoxConvention | str,
    model_wh: tuple[int, int] | None = None,
) -> Box:
    """Converts a model's box into source-image pixels, clipped to the image.

    Corners are reordered (a model may swap them).

    Args:
        box: ``[x1, y1, x2, y2]`` in the model's convention.
        image_wh: source ``(width, height)`` in px.
        convention: the model's convention.
        model_wh: ``(width, height)`` the model sees; required for ``absolute``.

    Returns:
        ``(x0, y0, x1, y1)`` in source pixels, ``0 <= x0 <= x1 <= width``.
    """
    _scales(image_wh, convention, model_wh)  # validates the arguments
    w, h = image_wh
    mw, mh = (1000, 1000) if BoxConvention(convention) is BoxConvention.RELATIVE_1000 else model_wh  # type: ignore[misc]
    a, b, c, d = (float(v) for v in box)
    # Multiply before dividing: 28 * 100 / 56 is exactly 50, 28 / 0.56 is not.
    x0, x1 = sorted((a * w / mw, c * w / mw))
    y0, y1 = sorted((b * h / mh, d * h / mh))
    clip = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
    return clip(x0, w), clip(y0, h), clip(x1, w), clip(y1, h)


def format_box(box: Sequence[float]) -> str:
    """A box as the prompts write it: ``[x1, y1, x2, y2]`` with integers."""
    return "[" + ", ".join(str(round(float(v))) for v in box) + "]"


def _scales(
    image_wh: tuple[int, int], convention: BoxConvention | str, model_wh: tuple[int, int] | None
) -> None:
    w, h = image_wh
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_wh}.")
    if BoxConvention(convention) is BoxConvention.ABSOLUTE and (model_wh is None or min(model_wh) <= 0):
        raise ValueError("absolute boxes need model_wh, the size the model sees (model_input_size()).")
