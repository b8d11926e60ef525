"""Distribution augmentation by one-pixel shifts: images moved in training, the shift given to the model as input.

Jun et al. (2020, "Distribution Augmentation for Generative Modeling") train p(x | t) on transformed images t(x)
with t as a conditioning input and score with the identity: the transformed copies teach the shared weights
without pulling the identity's distribution away from the data. With 1000 training digits this is the cheapest
extra data there is. ``SHIFTS[0]`` is the identity, the only shift scoring, sampling and the exported graphs use.
"""

from __future__ import annotations

import torch
from torch import Tensor

SHIFTS: tuple[tuple[int, int], ...] = ((0, 0),) + tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
"""(dy, dx) in pixels of every shift by at most one pixel; index 0 is the identity."""


def random_shifts(n: int, p: float) -> Tensor:
    """(n,) long indices into ``SHIFTS``: each one of the 8 real shifts with probability p (uniformly), else 0."""
    moved = torch.rand(n) < p
    return torch.where(moved, torch.randint(1, len(SHIFTS), (n,)), torch.zeros((), dtype=torch.long))


def shift_images(x: Tensor, shift: Tensor) -> Tensor:
    """x (B, H, W[, C]) with image b moved by ``SHIFTS[shift[b]]`` = (dy, dx) pixels; what moves in is level 0
    (the background of digits), what moves out is lost."""
    out = x.clone()
    for k, (dy, dx) in enumerate(SHIFTS):
        rows = (shift == k).nonzero().squeeze(-1)
        if k == 0 or not len(rows):
            continue
        moved = torch.roll(x[rows], (dy, dx), dims=(1, 2))
        if dy:
            moved[:, 0 if dy > 0 else -1] = 0
        if dx:
            moved[:, :, 0 if dx > 0 else -1] = 0
        out[rows] = moved
    return out
