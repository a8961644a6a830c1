"""Decode KV cache for causal attention: a plain buffer, or a ring buffer of W slots for a sliding window.

A sliding window of W keys never reads a key older than W - 1 positions before the query, so the
cache keeps only the last W keys: slot ``p % W`` holds position ``p``. ``extend`` appends T new keys
and returns, in position order, every key the T new queries can see (the needed old keys plus the new
ones), so prefill in pieces and one-token decoding share one path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # (B, Hkv, S, D) keys (already rotated); S = max_seqlen, or the window for a ring
    v: torch.Tensor  # (B, Hkv, S, D)
    capacity: int  # max tokens this cache may consume (max_seqlen)
    window: int | None = None  # keys a query sees (itself included); None = all
    pos: int = 0  # tokens consumed so far
    # Static mode (CUDA-graph decoding): the position also lives on the device, (1,) int64, and advances
    # inside the captured step; ``pos`` is then kept in step by the graph decoder.
    device_pos: torch.Tensor | None = None

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, head_dim: int, max_seqlen: int, window: int | None,
                 device=None, dtype=None) -> KVCache:
        slots = max_seqlen if window is None else min(window, max_seqlen)
        shape = (batch, kv_heads, slots, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   max_seqlen, window)

    @property
    def ring(self) -> bool:
        return self.k.shape[2] < self.capacity

    @property
    def kept(self) -> int:
        """KV entries held now (the window once it is full)."""
        return min(self.pos, self.k.shape[2])

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k/v (B, Hkv, T, D); return (keys, values, key positions) visible to the new queries."""
        T, offset = k.shape[2], self.pos
        if offset + T > self.capacity:
            raise ValueError(f"attention cache holds {self.capacity} tokens; cannot append {T} at position {offset}")
        start = 0 if self.window is None else max(0, offset - self.window + 1)  # oldest key any new query sees
        if not self.ring:
            self.k[:, :, offset:offset + T] = k
            self.v[:, :, offset:offset + T] = v
            keys, values = self.k[:, :, start:offset + T], self.v[:, :, start:offset + T]
        else:
            slots = self.k.shape[2]
            old = torch.arange(start, offset, device=k.device) % slots  # old positions, oldest first
            keys = torch.cat([self.k.index_select(2, old), k], dim=2)
            values = torch.cat([self.v.index_select(2, old), v], dim=2)
            keep = min(T, slots)  # only the last `slots` new keys survive
            new_slots = torch.arange(offset + T - keep, offset + T, device=k.device) % slots
            self.k.index_copy_(2, new_slots, k[:, :, T - keep:])
            self.v.index_copy_(2, new_slots, v[:, :, T - keep:])
        self.pos = offset + T
        return keys, values, torch.arange(start, offset + T, device=k.device)

    def make_static(self) -> None:
        """Enter static mode: one-token steps that read and advance ``device_pos`` (graph capturable)."""
        self.device_pos = torch.tensor([self.pos], device=self.k.device, dtype=torch.long)

    def extend_static(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append one token's k/v (B, Hkv, 1, D) at ``device_pos``; return the whole buffers and a (S,) mask of
        the slots the new query sees. Every shape is static, so the step can be captured once and replayed."""
        slots = self.k.shape[2]
        p = self.device_pos  # (1,)
        slot = p % slots if self.ring else p
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        s = torch.arange(slots, device=p.device)
        if self.ring:  # slot s holds position p - age, written only once that position was >= 0
            age = (p - s) % slots
            valid = age <= p
        else:  # slot s holds position s
            valid = s <= p
            if self.window is not None:
                valid = valid & (p - s < self.window)
        self.device_pos += 1
        return self.k, self.v, valid

    def static_key_bound(self) -> tuple[torch.Tensor | None, int | None]:
        """(key_end, window) for ``attention_decode`` after ``extend_static``: in a plain buffer slot s holds
        position s, so no slot at or past the advanced ``device_pos`` is valid (nor, with a window, before
        ``device_pos - window``). A ring buffer has no such bound: (None, None)."""
        if self.ring or self.device_pos is None:
            return None, None
        return self.device_pos, self.window
