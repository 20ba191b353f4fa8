"""recbole_iisan: IISAN-Versa for RecBole.

Side-adapted networks over frozen text and image foundation models, trained on cached
per-layer backbone states, run through RecBole's trainer and evaluators.
"""
from recbole_iisan.compat import add_numpy_aliases

# RecBole's metrics and samplers use numpy names removed in numpy 2; add them (only where
# missing) before any RecBole module runs.
add_numpy_aliases()

__version__ = "0.1.0"
