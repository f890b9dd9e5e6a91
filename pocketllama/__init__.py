"""pocketllama: run the Llama 3.2 family (text, vision, guard) on your own machine.

    >>> import pocketllama
    >>> llm = pocketllama.load("smollm2-135m")            # doctest: +SKIP
    >>> llm.chat([{"role": "user", "content": "Hi!"}])     # doctest: +SKIP

Exports are imported lazily so `pocketllama --help` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "Guard", "load", "__version__"]

if TYPE_CHECKING:
    from .guard import Guard
    from .llm import LLM, load


def __getattr__(name: str):
    if name in ("LLM", "load"):
        from . import llm

        return getattr(llm, name)
    if name == "Guard":
        from .guard import Guard

        return Guard
    raise AttributeError(f"module 'pocketllama' has no attribute {name!r}")
