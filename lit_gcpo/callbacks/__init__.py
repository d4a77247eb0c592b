"""Lightning callbacks of lit-gcpo (``lit_gcpo.callbacks``), reusable outside lit-gcpo: each reads only the batch."""

from __future__ import annotations

from lit_gcpo.callbacks.uncertainty import UncertaintyCallback

__all__ = ["UncertaintyCallback"]
