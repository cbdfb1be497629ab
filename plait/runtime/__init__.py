"""The serving runtime (needs torch). ``plait.Engine`` is ``plait.runtime.engine.Engine``."""

from plait.progress import import_tqdm_auto

import_tqdm_auto()  # before transformers imports it: no missing-ipywidgets TqdmWarning in notebooks
