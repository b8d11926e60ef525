"""Distribution augmentation: images moved (one-pixel shifts) or turned (the square's dihedral group) in training,
the transform given to the model as input.

Jun et al. (2020, "Distribution Augmentation for Generative Modeling") train p(x | t) on transformed images t(x)
with t as a conditioning input and score with the identity: the transformed copies teach the shared weights
without pulling the identity's distribution away from the data. With 1000 training digits this is the cheapest
extra data there is. ``SHIFTS[0]`` and ``DIHEDRAL[0]`` are the identities, the only transforms scoring, sampling
and the exported graphs use.
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


DIHEDRAL: tuple[str, ...] = ("identity", "rot90", "rot180", "rot270", "flip_h", "flip_v", "transpose",
                             "anti_transpose")
"""The 8 symmetries of the square (rotations counter-clockwise; flip_h mirrors left-right, flip_v top-bottom;
anti_transpose mirrors about the other diagonal); index 0 is the identity."""


def _turn(x: Tensor, name: str) -> Tensor:
    """x (B, H, W[, C]) with H == W under the named symmetry (pixels move, a pixel's channels stay together)."""
    if name == "identity":
        return x
    if name.startswith("rot"):
        return torch.rot90(x, int(name[3:]) // 90, dims=(1, 2))
    if name == "flip_h":
        return x.flip(2)
    if name == "flip_v":
        return x.flip(1)
    t = x.transpose(1, 2)
    return t if name == "transpose" else t.flip(1, 2)


def dihedral_positions(n: int) -> Tensor:
    """(8, n * n) long: row g is the flat source position of every flat position of an n x n image under
    ``DIHEDRAL[g]`` (out.flat[i] = x.flat[row[i]])."""
    idx = torch.arange(n * n).reshape(1, n, n)
    return torch.stack([_turn(idx, name).reshape(-1) for name in DIHEDRAL])


def check_square(shape: tuple[int, ...]) -> None:
    """ValueError unless ``shape`` is a square image (H, W) or (H, W, C) with H == W."""
    if not 2 <= len(shape) <= 3 or shape[0] != shape[1]:
        raise ValueError(f"dihedral_aug turns square images (H, H) or (H, H, C), not data of shape {shape}")


def random_dihedral(n: int, p: float) -> Tensor:
    """(n,) long indices into ``DIHEDRAL``: each of the 7 non-identity symmetries with probability p (uniformly),
    else 0."""
    turned = torch.rand(n) < p
    return torch.where(turned, torch.randint(1, len(DIHEDRAL), (n,)), torch.zeros((), dtype=torch.long))


def dihedral_images(x: Tensor, g: Tensor) -> Tensor:
    """x (B, H, H[, C]) with image b under ``DIHEDRAL[g[b]]``; nothing is lost (a permutation of the pixels)."""
    check_square(tuple(x.shape[1:]))
    out = x.clone()
    for k, name in enumerate(DIHEDRAL):
        rows = (g == k).nonzero().squeeze(-1)
        if k and len(rows):
            out[rows] = _turn(x[rows], name)
    return out
