"""plait: a structured-generation language for LLMs and the runtime that serves it.

The runtime (``plait.Engine``) needs torch; it is imported lazily so that ``import plait`` and
``plait.lang`` work without torch installed.
"""

from plait.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["Engine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "Engine":
        from plait.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'plait' has no attribute {name!r}")
