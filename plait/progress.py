"""Progress bars: ``tqdm.auto``'s ``tqdm``, imported without its "IProgress not found" warning.

In a Jupyter kernel ``tqdm.auto`` draws an ipywidgets bar; without ipywidgets installed it falls back
to the text bar and, on first import, emits ``TqdmWarning: IProgress not found. Please update jupyter
and ipywidgets``. That warning is advice for widget bars, which plait does not need: a text bar is
what it falls back to anyway. ``import_tqdm_auto`` imports ``tqdm.auto`` with that one warning
silenced; the runtime calls it before importing transformers (whose ``huggingface_hub`` imports
``tqdm.auto`` too), so a notebook that only uses plait shows no such warning.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["import_tqdm_auto", "tqdm"]


def import_tqdm_auto() -> Any:
    """``tqdm.auto.tqdm``, importing it (once) without the missing-ipywidgets ``TqdmWarning``."""
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        from tqdm.auto import tqdm as auto_tqdm
    return auto_tqdm


tqdm = import_tqdm_auto()
