"""KV caches for incremental decoding: what each attention path keeps per token.

``naive`` keeps the expanded keys and values: H·(d_h + d_h^R) + H·d_v numbers per token
per layer, like MHA. ``absorb`` keeps only the compressed latent c^KV (kv_lora_rank numbers,
after its norm) and the shared RoPE key k^R (qk_rope_head_dim numbers): 512 + 64 = 576 for
DeepSeek-V3 against 32,768 for MHA-equivalent keys and values of 128 heads.
"""

from __future__ import annotations

import torch


class KVCache:
    """Pre-allocated per-layer buffers [B, max_len, ...], filled left to right.

    ``seq_len`` counts the tokens already cached; the model advances it once per forward,
    after every layer has written the new tokens at positions seq_len ... seq_len+T-1.
    """

    def __init__(self, batch_size: int, max_len: int, impl: str) -> None:
        if impl not in ("naive", "absorb"):
            raise ValueError(f"KVCache impl must be 'naive' or 'absorb', got {impl!r}")
        self.batch_size, self.max_len, self.impl = batch_size, max_len, impl
        self.seq_len = 0
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this step's tensors [B, T, ...] for one layer; return all cached so far."""
        b, t = new[0].shape[:2]
        end = self.seq_len + t
        if b != self.batch_size:
            raise ValueError(f"KVCache holds batch {self.batch_size}, got a batch of {b}")
        if end > self.max_len:
            raise ValueError(
                f"KVCache is full: {self.seq_len} cached + {t} new > max_len {self.max_len}"
            )
        if layer_idx not in self._buffers:
            self._buffers[layer_idx] = tuple(
                x.new_empty(b, self.max_len, *x.shape[2:]) for x in new
            )
        bufs = self._buffers[layer_idx]
        for buf, x in zip(bufs, new):
            buf[:, self.seq_len : end] = x
        return tuple(buf[:, :end] for buf in bufs)

    def nbytes(self) -> int:
        """Bytes held by the filled part of the cache, all layers."""
        return sum(
            buf[:, : self.seq_len].numel() * buf.element_size()
            for bufs in self._buffers.values()
            for buf in bufs
        )
