"""Static, preallocated key/value cache: one slot per (batch row, absolute position).

Row b writes the K/V of the token at position p into slot p, and attends to slots 0..p. Shapes are fixed
at creation, so a decode step never allocates and can be compiled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class KVCache:
    """Per-layer K and V buffers, each (B, KV heads, max_len, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs batch_size and max_len > 0, got {batch_size} and {max_len}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def update(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Write k/v (B, KV, T, hd) of `rows` (B, 1) at `positions` (B, T)."""
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, KV, hd)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (prefix sharing)."""
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]
