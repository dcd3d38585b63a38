"""KV caches and the attention over them, for one forward of a batch of requests.

The model asks a batch for token positions and hands it each layer's new keys and values
(`AttentionBatch`); the batch writes them into its caches and attends. Two kinds:

- `RequestBatch`: requests with their own `KVCache` each and their own positions; any
  number of new tokens (prefill or decode). Linear layers run batched, attention loops over
  the requests (each reads only its own length). Requests join and leave between steps.
- `SlotBatch`: a fixed set of slots in one `SlotCache`, one new token per slot, every
  shape static and positions kept on the device, so a decode step holds no host sync and
  can be captured as a CUDA graph.
"""

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from exo.worker.engines.torch import cpu_ops


class AttentionBatch(Protocol):
    @property
    def positions(self) -> Tensor:
        """[B, L] position of each new token."""
        ...

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: bool = False
    ) -> Tensor:
        """Store k, v [B, n_kv, L, d] in layer's cache; attention of q [B, n_heads, L, d].
        `kernel`: decode through our batched attention kernel (`cpu_ops.decode_attention`)."""
        ...

    def advance(self) -> None:
        """The forward is done: the new tokens count as cached."""
        ...


class KVCache:
    """Keys and values of one request for every layer of a stage: [n_kv, capacity, d] each."""

    def __init__(self, keys: list[Tensor], values: list[Tensor]) -> None:
        self.keys = keys
        self.values = values
        self.capacity = keys[0].shape[1] if keys else 0
        self.length = 0

    @classmethod
    def allocate(
        cls,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> "KVCache":
        # torch.empty: pages of a long context stay unmapped until tokens reach them.
        shape = (n_kv_heads, capacity, head_dim)
        return cls(
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)],
        )


class RequestBatch:
    """L new tokens for each of B requests, each at its own position."""

    def __init__(self, caches: Sequence[KVCache], n_new: int, device: torch.device) -> None:
        if not caches:
            raise ValueError("an empty batch")
        self.caches = caches
        self.n_new = n_new
        self.starts = [cache.length for cache in caches]
        for cache in caches:
            if cache.length + n_new > cache.capacity:
                raise ValueError(f"context of {cache.capacity} tokens is full")
        offsets = torch.arange(n_new, device=device)
        self._positions = torch.tensor(self.starts, device=device)[:, None] + offsets
        # Only a chunk after cached tokens needs an explicit mask (bottom-right causal).
        self._masks = [self._mask(start, n_new, device) for start in self.starts]

    @staticmethod
    def _mask(start: int, n_new: int, device: torch.device) -> Tensor | None:
        if n_new == 1 or start == 0:
            return None
        keys = torch.arange(start + n_new, device=device)
        return keys[None, :] <= (start + torch.arange(n_new, device=device))[:, None]

    @property
    def positions(self) -> Tensor:
        return self._positions

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: bool = False
    ) -> Tensor:
        if self.n_new == 1:
            keys = [cache.keys[layer] for cache in self.caches]
            values = [cache.values[layer] for cache in self.caches]
            return attend_one_new(q, k, v, keys, values, self.starts, scale, kernel)
        outs: list[Tensor] = []
        for b, (cache, start, mask) in enumerate(
            zip(self.caches, self.starts, self._masks, strict=True)
        ):
            end = start + self.n_new
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:, start:end] = k[b]
            values[:, start:end] = v[b]
            outs.append(
                F.scaled_dot_product_attention(
                    q[b],
                    keys[:, :end],
                    values[:, :end],
                    attn_mask=mask,
                    is_causal=mask is None and self.n_new > 1,
                    scale=scale,
                    enable_gqa=True,
                )
            )
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)

    def advance(self) -> None:
        for cache in self.caches:
            cache.length += self.n_new


def attend_one_new(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    starts: Sequence[int],
    scale: float,
    kernel: bool = False,
) -> Tensor:
    """A decode step's attention: row b's new key and value go to position starts[b] of its
    own cache (keys[b], values[b]: [n_kv, capacity, d]), its query attends to [0, starts[b]].
    Eager and compiled decode steps (compiled.py) both run this. `kernel`: one call of our
    batched attention instead of one SDPA per request (the stage decides at load)."""
    for b, (cached_k, cached_v, start) in enumerate(zip(keys, values, starts, strict=True)):
        cached_k[:, start : start + 1] = k[b]
        cached_v[:, start : start + 1] = v[b]
    if kernel:
        lengths = [start + 1 for start in starts]
        avx2 = cpu_ops.forced_avx2()
        return cpu_ops.decode_attention(q, list(keys), list(values), lengths, scale, avx2)
    outs = [
        F.scaled_dot_product_attention(
            q[b], cached_k[:, : start + 1], cached_v[:, : start + 1], scale=scale, enable_gqa=True
        )
        for b, (cached_k, cached_v, start) in enumerate(zip(keys, values, starts, strict=True))
    ]
    return torch.stack(outs)


class SlotCache:
    """Keys and values of `slots` requests for every layer: [slots, n_kv, capacity, d] each,
    plus each slot's length and whether it is in use, all on the device."""

    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (slots, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.int64, device=device)
        self.active = torch.zeros(slots, dtype=torch.int64, device=device)
        self.slots = slots
        self.capacity = capacity

    def view(self, slot: int) -> KVCache:
        """The slot as a request cache (sharing storage), for its prefill."""
        return KVCache([k[slot] for k in self.keys], [v[slot] for v in self.values])

    def occupy(self, slot: int, length: int) -> None:
        """A prefilled request takes the slot: decode steps now advance it."""
        self.lengths[slot] = length
        self.active[slot] = 1

    def release(self, slot: int) -> None:
        self.active[slot] = 0
        self.lengths[slot] = 0


class SlotBatch:
    """One new token in every slot of a `SlotCache`; idle slots compute and are ignored."""

    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        # An idle or full slot writes to its last position, never out of bounds.
        self._write_at = cache.lengths.clamp(max=cache.capacity - 1)
        key_positions = torch.arange(cache.capacity, device=cache.lengths.device)
        # [slots, 1 head, 1 query, capacity]: a slot sees its cached tokens and the new one.
        self._mask = (key_positions[None, :] <= self._write_at[:, None])[:, None, None, :]

    @property
    def positions(self) -> Tensor:
        return self._write_at[:, None]

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: bool = False
    ) -> Tensor:
        # The slots' masked attention over the whole capacity is one SDPA call already.
        index = self._write_at.view(-1, 1, 1, 1).expand(k.shape)
        keys = self.cache.keys[layer].scatter_(2, index, k.to(self.cache.keys[layer].dtype))
        values = self.cache.values[layer].scatter_(2, index, v.to(self.cache.values[layer].dtype))
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self._mask, scale=scale, enable_gqa=True
        )

    def advance(self) -> None:
        self.cache.lengths.add_(self.cache.active)
