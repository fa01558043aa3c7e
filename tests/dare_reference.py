"""An independent port of lorafuse's documented DARE mask generator (README, primitives.Draws), in plain Python
integers: SplitMix64 over the counter ⌊i/2⌋ + 1 from a key of SHA-256(f"{seed}:{name}:{module}"), 32-bit words
little-end first, entry i kept iff its word < ⌊(1 − p)·2³²⌋."""

from __future__ import annotations

import hashlib

import torch

MASK64 = 2**64 - 1


def key_of(seed: int, name: str, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{module}".encode()).digest()[:8], "little")


def splitmix64(key: int, counter: int) -> int:
    z = (key + counter * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def words(key: int, count: int) -> list[int]:
    out = []
    for c in range((count + 1) // 2):
        z = splitmix64(key, c + 1)
        out += [z & 0xFFFFFFFF, z >> 32]
    return out[:count]


def keep_mask(key: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The DARE keep mask (bool) of a block of `shape`, entries in row-major order."""
    n = 1
    for s in shape:
        n *= s
    limit = int((1 - p) * 2**32)
    return torch.tensor([w < limit for w in words(key, n)], dtype=torch.bool).reshape(shape)
