"""The ``hf`` engine's KV cache: transformers' ``DynamicCache`` with its full-attention layers writing into
buffers allocated once.

``DynamicCache`` appends each step's keys and values with ``torch.cat``, which copies the whole cache of every
layer at every generated token: O(T^2) bytes moved for T tokens, and on a small CPU model the largest single
cost of the sampling loop (``torch.cat`` and ``batch_select_indices`` took more time than the linear layers,
cProfile of 64 rows x 32 tokens). :class:`PreallocatedLayer` allocates each layer's keys and values for the
prompt plus every new token at the first update and writes each step into its next columns; the cache hands
the attention a view of the columns written so far, so the attention reads the same numbers as from the
concatenated tensors. Dropping rows (``batch_select_indices``) moves the kept rows' written columns to the
front of the same buffers, in place.

Sliding-window and other special layers (a config that declares them) stay transformers' own.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in ``[rows, heads, capacity, head_dim]`` buffers.

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
        rows, heads, _, key_dim = key_states.shape
        value_heads, value_dim = value_states.shape[1], value_states.shape[-1]
        self._key_buffer = key_states.new_empty((rows, heads, self.capacity, key_dim))
        self._value_buffer = value_states.new_empty((rows, value_heads, self.capacity, value_dim))
        self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states`` / ``value_states`` ``[rows, heads, q, head_dim]`` after the columns held so far;
        returns views of all the columns written."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"the KV cache holds {self.capacity} columns; writing column {end} overflows it")
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

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers are :class:`PreallocatedLayer` s of
    ``capacity`` columns (the layer types of the config decide, as in ``DynamicCache``)."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # no layer types known from the config: transformers would add plain layers lazily
        cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)
        return cache
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
