"""Every workaround for today's stack (numpy 2, torch >= 2.6, RecBole 1.2.1) lives here.

RecBole 1.2.1 was released against numpy 1 and torch < 2.6; the fixes below are the
smallest changes that let it run unmodified, and none of them is process-wide beyond
re-adding numpy names that numpy 2 removed.
"""
from __future__ import annotations

from contextlib import contextmanager

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


def import_hyperopt():
    """hyperopt (RecBole pins 0.2.5), importable where setuptools no longer ships pkg_resources.

    hyperopt 0.2.5 imports ``pkg_resources`` at import time, for its ATPE algorithm's
    bundled model files only (RecBole's HyperTuning never uses ATPE); setuptools >= 81
    removed that module. A stand-in offering ``resource_string`` is present during the
    import alone and removed right after, so nothing else ever sees it.
    """
    try:
        import hyperopt
        return hyperopt
    except ModuleNotFoundError as err:
        if err.name == "hyperopt":
            raise ModuleNotFoundError(
                "hyperparameter tuning needs hyperopt==0.2.5 (RecBole's pin): "
                "pip install 'recbole_iisan[tune]'", name="hyperopt") from None
        if err.name != "pkg_resources":
            raise
    import importlib.resources
    import sys
    import types

    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_string = (
        lambda package, name: importlib.resources.files(package).joinpath(name).read_bytes())
    sys.modules["pkg_resources"] = stand_in
    try:
        import hyperopt
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]
    return hyperopt


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def autocast_dtype(device, name: str | None):
    """Make ``name`` the dtype of RecBole's ``enable_amp`` autocast on ``device`` meanwhile.

    RecBole opens ``torch.autocast`` without a dtype, so it takes the device's default
    (float16 on CUDA); this sets that default for the duration, e.g. to bfloat16.
    """
    if not name:
        yield
        return
    if name not in AMP_DTYPES:
        raise ValueError(f"amp_dtype '{name}' is not one of {', '.join(AMP_DTYPES)}")
    kind = torch.device(device).type
    previous = torch.get_autocast_dtype(kind)
    torch.set_autocast_dtype(kind, AMP_DTYPES[name])
    try:
        yield
    finally:
        torch.set_autocast_dtype(kind, previous)
