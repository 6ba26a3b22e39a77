"""A key/value cache for sampling that appends in place instead of concatenating.

transformers' ``DynamicCache`` grows each layer's keys and values with ``torch.cat`` at every decoding step, so a
step copies the whole cache: for a sampling batch of 192 sequences that is quadratic in the sample's length and, on a
CPU, the largest cost of generation (profiled on the CI policy, 48 prompts x 4 samples: ``torch.cat`` 50 s of 83 s).
A ``StaticCache`` removes the copies but attends over its whole preallocated length at every step, which measured
slower still (111 s against 91 s). ``GrowingCache`` keeps a buffer per layer whose capacity doubles when it fills,
writes each step's keys and values into it, and hands attention a view of the filled part: amortised O(1) copying and
attention over the current length only. The values attention sees are the same numbers in the same order, so the
samples are those of ``DynamicCache`` (``tests/test_kv_cache.py``).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One decoder layer's keys and values `[B, H, T, D]`, as views of buffers `[B, H, capacity, D]`."""

    min_capacity = 64

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None
        self._filled = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `[B, H, t, D]` keys and values; return the views of everything cached `[B, H, T, D]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self._filled, self._filled + key_states.shape[-2]
        if self._k_buf is None or stop > self._k_buf.shape[-2]:
            capacity = max(stop, 2 * (0 if self._k_buf is None else self._k_buf.shape[-2]), self.min_capacity)
            self._k_buf = self._grow(self._k_buf, key_states, capacity)
            self._v_buf = self._grow(self._v_buf, value_states, capacity)
        self._k_buf[..., start:stop, :] = key_states
        self._v_buf[..., start:stop, :] = value_states
        self._filled = stop
        self.keys = self._k_buf[..., :stop, :]
        self.values = self._v_buf[..., :stop, :]
        return self.keys, self.values

    def _grow(self, buf: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        new = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if buf is not None:
            new[..., :self._filled, :] = buf[..., :self._filled, :]
        return new

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self._k_buf is not None:
            self._filled = self.keys.shape[-2]

    def reset(self) -> None:
        self._k_buf = self._v_buf = None
        self._filled = 0
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GrowingCache is for sampling; beam search and contrastive search need DynamicCache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("GrowingCache is for sampling; beam search and contrastive search need DynamicCache")


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of ``GrowingLayer``s: pass ``cache=GrowingCache()`` to ``generate`` (sampling or greedy;
    one cache per call; transformers 5 deprecates the ``past_key_values=`` spelling)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
