"""Lightning callbacks of lit-gcpo, importable as ``lit_gcpo.callbacks`` (reusable outside lit-gcpo)."""

from __future__ import annotations

from lit_gcpo.callbacks.uncertainty import UncertaintyCallback

__all__ = ["UncertaintyCallback"]
