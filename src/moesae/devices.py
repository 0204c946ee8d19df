"""One definition of the ``device`` setting every stage accepts: ``auto`` (CUDA when torch sees a
GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>``, ``mps``."""
from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "auto | cpu | cuda | cuda:<index> | mps"
_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def check_device(value: object, field: str = "device") -> str:
    """Validate a device setting; raises ``ValueError`` naming the field and the choices."""
    if not isinstance(value, str) or not _PATTERN.match(value):
        raise ValueError(f"'{field}' must be one of {DEVICE_CHOICES}, got {value!r}")
    return value


def resolve_device(value: str, field: str = "device") -> torch.device:
    """The torch device a setting names; a GPU that is asked for but absent is a clear error."""
    check_device(value, field)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"'{field}: {value}' requested but torch sees no CUDA GPU; set it to 'auto' or 'cpu'")
    if value == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError(f"'{field}: mps' requested but this torch has no MPS device; set it to 'auto' or 'cpu'")
    return torch.device(value)
