"""Device and dtype choice for the model stages (SAM2, in-process VLM).

One rule for every model: ``auto`` means CUDA when torch sees a CUDA device,
else CPU; dtype ``auto`` means bfloat16 on CUDA and float32 elsewhere (CPU
bf16 kernels are slow and some are missing). torch is passed in, so this
module imports nothing heavy and each stage keeps its own lazy import with
its own install hint.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("bfloat16", "float16", "float32")


def resolve_device(torch: Any, device: str, setting: str) -> str:
    """``auto`` becomes ``cuda`` when a CUDA device is visible, else ``cpu``.

    Args:
        torch: the imported torch module.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        setting: the config key, named in errors (e.g. ``verify_sam2.device``).

    Raises:
        RuntimeError: a CUDA device is asked for but torch sees none.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"{setting} is {device!r} but torch sees no CUDA device; "
            f"set {setting}=cpu (slow) or run on a machine with a GPU."
        )
    return device


def resolve_dtype(torch: Any, dtype: str, device: str, setting: str) -> Any:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere; otherwise the named dtype.

    Raises:
        ValueError: ``dtype`` is not ``auto`` or one of ``DTYPES``.
    """
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"{setting} {dtype!r} is not one of auto, {', '.join(sorted(DTYPES))}.")
    return getattr(torch, dtype)
