"""The log-mean-exp of Monte Carlo draws: the dequantisation bound shared by training and serving (numpy only).

A density p fitted to dequantised integer data (y = x + u, u ~ U[0, 1)^D) gives P(x) = E_u p(x + u), so for K
uniform draws

    log (1/K) sum_k p(x + u_k)  (the log-mean-exp)   >=   (1/K) sum_k log p(x + u_k)  (the mean),

and both are lower bounds on log P(x) in expectation (Jensen). The log-mean-exp tightens as K grows and tends to
log P(x) itself, as the importance-weighted bound does (Burda et al. 2016); the mean does not move with K. The
PyTorch models (training.realnvp, training.ppca) and the serving programs (server.programs.base) both add their
draws through ``LogMeanExp``, one draw at a time in the same order, so evaluated and served numbers are the same
float64 arithmetic on the same per-draw values. ``add_draws`` adds a block of draws at once with the same
arithmetic as adding them one by one (bit for bit), at a fraction of the Python calls: the server scores a
request's draws as one block.

Example:
    >>> acc = LogMeanExp(2)
    >>> for row in ([-3.0, 0.0], [-1.0, 0.0]):
    ...     acc.add(np.array(row))
    >>> bool(np.allclose(acc.value(), [np.log((np.exp(-3) + np.exp(-1)) / 2), 0.0]))
    True
"""

from __future__ import annotations

import math

import numpy as np

SCALAR_ROWS = 8
"""``LogMeanExp.add_draws`` runs its running sum on Python floats up to this many rows (numpy's per-call cost
outweighs its speed below that)."""


class LogMeanExp:
    """Running log((1/K) sum_k exp(a_k)) of K draws a_k (each (N,)), in float64 with a running maximum, so
    memory stays O(N) however many draws are added and no exp overflows or underflows to a wrong answer."""

    def __init__(self, n: int) -> None:
        self.top = np.full(n, -np.inf)  # the largest draw so far, per row
        self.total = np.zeros(n)  # sum_k exp(a_k - top), per row
        self.count = 0

    def add(self, draw: np.ndarray) -> None:
        """Add one draw a_k, shape (N,), nats."""
        a = np.asarray(draw, dtype=np.float64)
        top = np.maximum(self.top, a)
        safe = np.where(np.isfinite(top), top, 0.0)  # all draws -inf so far: nothing to rescale
        with np.errstate(invalid="ignore"):
            self.total = self.total * np.exp(self.top - safe) + np.exp(a - safe)
        self.top = top
        self.count += 1

    def add_draws(self, draws: np.ndarray) -> None:
        """Add K draws at once, shape (K, N), nats: the same numbers as ``add`` of each row in order, bit for bit.

        The running maxima are a cumulative maximum (exact), so every draw's rescaling factor and term are the
        same elementwise float64 operations as in ``add``, computed for the whole block; only the running sum
        is sequential, one multiply and one add per draw and row. For a few rows (a 1-row request) that runs on
        Python floats, whose IEEE double arithmetic is numpy's: 16 draws of one row cost about a tenth of 16
        ``add`` calls.
        """
        a = np.asarray(draws, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.top.shape[0]:
            raise ValueError(f"draws must be (K, {self.top.shape[0]}), got shape {a.shape}")
        if not a.shape[0]:
            return
        tops = np.maximum.accumulate(np.concatenate([self.top[None], a]), axis=0)  # row k: top after k draws
        safe = np.where(np.isfinite(tops[1:]), tops[1:], 0.0)
        with np.errstate(invalid="ignore"):
            scale = np.exp(tops[:-1] - safe)
            term = np.exp(a - safe)
        if a.shape[1] <= SCALAR_ROWS:
            total = self.total.tolist()
            for s_k, t_k in zip(scale.tolist(), term.tolist(), strict=True):
                total = [x * s + t for x, s, t in zip(total, s_k, t_k, strict=True)]
            self.total = np.array(total, dtype=np.float64)
        else:
            total = self.total.copy()
            with np.errstate(invalid="ignore"):
                for s_k, t_k in zip(scale, term, strict=True):
                    np.multiply(total, s_k, out=total)
                    np.add(total, t_k, out=total)
            self.total = total
        self.top = tops[-1].copy()
        self.count += a.shape[0]

    def value(self) -> np.ndarray:
        """log((1/K) sum_k exp(a_k)), (N,) float64; ValueError before any draw."""
        if not self.count:
            raise ValueError("no draws added; the log-mean-exp of nothing is undefined")
        safe = np.where(np.isfinite(self.top), self.top, 0.0)
        with np.errstate(divide="ignore"):
            return np.where(np.isfinite(self.top), safe + np.log(self.total) - math.log(self.count), self.top)
