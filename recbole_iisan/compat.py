"""Every workaround for today's stack (numpy 2, torch >= 2.6, RecBole 1.2.1) lives here.

RecBole 1.2.1 was released against numpy 1 and torch < 2.6; the fixes below are the
smallest changes that let it run unmodified, and none of them is process-wide beyond
re-adding numpy names that numpy 2 removed.
"""
from __future__ import annotations

import numpy as np
import torch

# Names RecBole (Config.compatibility_settings, metrics, samplers) still uses. numpy 2
# removed some of them; numpy 1 still has them, and those must never be replaced.
_NUMPY_ALIASES = {
    "bool": np.bool_,
    "int": np.int_,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int_,
    "unicode": np.str_,
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
}


def add_numpy_aliases() -> None:
    """Add the removed numpy aliases RecBole expects, only where they are missing."""
    for name, target in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, target)


def load_checkpoint(path, map_location=None) -> dict:
    """Load a RecBole checkpoint.

    torch >= 2.6 defaults to ``weights_only=True``, which refuses RecBole's checkpoints
    because they pickle the Config. The files are written by our own trainer, so the
    full unpickler is used for this call only (no environment variable is touched).
    """
    return torch.load(str(path), map_location=map_location, weights_only=False)
