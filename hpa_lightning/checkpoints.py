"""The one reader of checkpoint files: `torch.load(weights_only=True)`, never retried unsafely, errors as one line."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from hpa_lightning.errors import InferenceError


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> object:
    """`torch.load(weights_only=True)`; anything that needs unrestricted unpickling is refused, never retried."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported [^.\n]*", str(err))  # e.g. "Unsupported global: GLOBAL os.system ..."
        detail = f": {found.group(0).strip()}" if found else ""
        raise InferenceError(f"refusing to load {path} (not loadable with weights_only=True{detail})") from None
    except FileNotFoundError:
        raise InferenceError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - a truncated or crafted file makes the unpickler raise anything
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
        raise InferenceError(f"{path}: not a readable checkpoint ({reason})") from None
