"""The ``hf`` engine's KV cache: transformers' ``DynamicCache`` with its full-attention layers writing into
buffers that grow by doubling.

``DynamicCache`` appends each step's keys and values with ``torch.cat``, which copies the whole cache of every
layer at every generated token: O(T^2) bytes moved for T tokens, and on a small CPU model the largest single
cost of the sampling loop (``torch.cat`` and ``batch_select_indices`` took more time than the linear layers,
cProfile of 64 rows x 32 tokens). :class:`BufferedLayer` writes each step into the next columns of buffers
that grow by doubling (at most to the prompt plus every new token: O(T) bytes moved in all, and never more than
twice the columns in use, so a batch whose rows end early does not hold a full-length cache from the start); the
cache hands the attention a view of the columns written so far, so the attention reads the same numbers as from
the concatenated tensors. Dropping rows (``batch_select_indices``) moves the kept rows' written columns to the
front of the same buffers, in place.

Sliding-window and other special layers (a config that declares them) stay transformers' own.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in ``[rows, heads, columns, head_dim]`` buffers that grow by
    doubling up to ``capacity`` columns.

    ``keys`` / ``values`` are views of the first ``length`` columns (so transformers' own
    ``get_seq_length`` and mask sizes read them as a dynamic layer's). Writing past ``capacity`` is an error.

    Args:
        capacity: the most columns the layer will hold (prompt width + new tokens).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buffer, self._value_buffer = key_states[:, :, :0], value_states[:, :, :0]
        self.keys, self.values = self._key_buffer, self._value_buffer
        self.is_initialized = True

    def _reserve(self, columns: int) -> None:
        """Grow the buffers to hold at least ``columns`` (doubling, at most ``capacity``), keeping what is written."""
        held = self._key_buffer.shape[2]
        if columns <= held:
            return
        if columns > self.capacity:
            raise RuntimeError(f"the KV cache holds {self.capacity} columns; writing column {columns} overflows it")
        size = min(self.capacity, max(columns, 2 * held))
        length = self.keys.shape[-2]
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            rows, heads, _, dim = old.shape
            new = old.new_empty((rows, heads, size, dim))
            new[:, :, :length] = old[:, :, :length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states`` / ``value_states`` ``[rows, heads, q, head_dim]`` after the columns held so far;
        returns views of all the columns written."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self._reserve(end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (increasing), moved to the front of the buffers."""
        if not self.is_initialized:
            return
        length, kept = self.keys.shape[-2], indices.numel()
        for name in ("_key_buffer", "_value_buffer"):
            buffer = getattr(self, name)
            buffer[:kept, :, :length] = buffer[indices, :, :length]  # the right side is a copy: no overlap
            setattr(self, name, buffer[:kept])
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def batch_gather(self, indices: torch.Tensor) -> None:
        """Rows ``indices`` (any order, repeats allowed: a prompt's row copied to its completions' rows), into new
        buffers of the columns written."""
        if not self.is_initialized:
            return
        length = self.keys.shape[-2]
        self._key_buffer = self._key_buffer[indices, :, :length]  # advanced indexing: a copy
        self._value_buffer = self._value_buffer[indices, :, :length]
        self.keys, self.values = self._key_buffer, self._value_buffer

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def buffered_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers are :class:`BufferedLayer` s of
    ``capacity`` columns (the layer types of the config decide, as in ``DynamicCache``)."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # no layer types known from the config: transformers would add plain layers lazily
        cache.layer_class_to_replicate = lambda: BufferedLayer(capacity)
        return cache
    cache.layers = [BufferedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def gathers_rows(cache: DynamicCache) -> bool:
    """Whether :func:`gather_rows` can copy rows of ``cache``: every layer a :class:`BufferedLayer` or a plain
    ``DynamicLayer`` (layers the cache adds later are :class:`BufferedLayer` s); other kinds may keep more state."""
    return all(type(layer) in (BufferedLayer, DynamicLayer) for layer in cache.layers)


def gather_rows(cache: DynamicCache, indices: torch.Tensor) -> None:
    """Replace the rows of every layer of ``cache`` (:func:`gathers_rows`) by its rows ``indices`` (repeats allowed)."""
    for layer in cache.layers:
        if isinstance(layer, BufferedLayer):
            layer.batch_gather(indices)
        else:
            layer.batch_select_indices(indices)
