"""Dequantised scoring (flow, pPCA): the log-mean-exp bound, all draws of a request in one submission, the same
numbers as draw by draw, and a bound that tightens with the number of draws."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.core.bounds import LogMeanExp
from genserve.core.noise import Noise
from genserve.server.programs import base
from genserve.server.programs.base import dequantised_log_prob, run_sync


def graph(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in density whose rows depend on x and u non-linearly (so a mixed-up row or draw shows)."""
    x = feeds["x"].reshape(len(feeds["x"]), -1)
    return {"log_prob": (np.sin(x * 1.3 + feeds["u"] * 7.0) * np.arange(1, x.shape[1] + 1)).sum(axis=1)
            .astype(np.float32)}


def draw_by_draw(x: np.ndarray, seed: int, draws: int) -> np.ndarray:
    """(draws, N) float64: each draw's log p(x + u) scored alone, in the documented noise order."""
    noise = Noise(seed)
    return np.stack([graph({"x": x, "u": noise.uniform(len(x), 64)})["log_prob"] for _ in range(draws)]
                    ).astype(np.float64)


def one_draw_at_a_time(x: np.ndarray, seed: int, draws: int) -> np.ndarray:
    bound = LogMeanExp(len(x))
    for row in draw_by_draw(x, seed, draws):
        bound.add(row)
    return bound.value().astype(np.float32)


@pytest.mark.parametrize("rows", [1, 3, 300, 5000])
def test_equals_draw_by_draw_with_few_submissions(rows: int) -> None:
    x = np.random.default_rng(rows).integers(0, 17, (rows, 8, 8)).astype(np.float32)
    calls: list[int] = []

    async def run(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert name == "forward"
        assert feeds["x"].shape[1:] == (8, 8) and feeds["u"].shape == (len(feeds["x"]), 64)
        calls.append(len(feeds["x"]))
        return graph(feeds)

    got = run_sync(dequantised_log_prob(run, "forward", x, Noise(9), 64, 16))
    want = one_draw_at_a_time(x, 9, 16)
    assert got.dtype == np.float32 and got.shape == (rows,)
    assert np.array_equal(got, want)  # bitwise: same uniforms, same order of addition
    per_call = max(1, base.DEQUANT_ROWS // rows)
    assert len(calls) == -(-16 // per_call)  # 1 submission for small requests, never more than the 16 draws
    assert max(calls) <= max(base.DEQUANT_ROWS, rows)


def test_is_the_log_mean_exp_of_the_draws_not_their_mean() -> None:
    x = np.random.default_rng(0).integers(0, 17, (5, 8, 8)).astype(np.float32)

    async def run(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return graph(feeds)

    got = run_sync(dequantised_log_prob(run, "forward", x, Noise(3), 64, 8)).astype(np.float64)
    draws = draw_by_draw(x, 3, 8)
    top = draws.max(axis=0)
    want = top + np.log(np.exp(draws - top).mean(axis=0))  # log (1/K) sum_k p_k, independently written
    assert np.allclose(got, want, rtol=1e-6, atol=1e-4)
    assert (got > draws.mean(axis=0) + 1e-3).all()  # Jensen: strictly above the mean for draws that differ


def test_the_bound_tightens_with_the_number_of_draws() -> None:
    """The expected log-mean-exp rises with K (Burda et al.'s monotonicity); averaged over rows and seeds, a
    bigger K scores higher, and K = 1 is the mean of single draws."""
    x = np.random.default_rng(1).integers(0, 17, (200, 8, 8)).astype(np.float32)

    async def run(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return graph(feeds)

    means = [np.mean([run_sync(dequantised_log_prob(run, "forward", x, Noise(s), 64, k)).mean() for s in range(3)])
             for k in (1, 4, 32)]
    assert means[0] < means[1] < means[2]
    assert np.allclose(run_sync(dequantised_log_prob(run, "forward", x, Noise(5), 64, 1)),
                       draw_by_draw(x, 5, 1)[0], atol=1e-4)


def test_log_mean_exp_is_stable_for_far_apart_and_infinite_draws() -> None:
    bound = LogMeanExp(3)
    for row in ([-5000.0, -np.inf, 0.0], [-4000.0, -np.inf, 1000.0], [-6000.0, -np.inf, -1000.0]):
        bound.add(np.array(row))
    got = bound.value()
    assert np.allclose(got[[0, 2]], [-4000.0 - np.log(3), 1000.0 - np.log(3)])  # no overflow, no underflow
    assert got[1] == -np.inf
    with pytest.raises(ValueError, match="no draws"):
        LogMeanExp(1).value()


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 50])  # both sides of SCALAR_ROWS
def test_a_block_of_draws_adds_exactly_as_the_draws_one_by_one(rows: int) -> None:
    rng = np.random.default_rng(rows)
    for trial in range(200):
        scale = [1.0, 50.0, 1e3, 1e6][trial % 4]
        draws = rng.standard_normal((int(rng.integers(1, 20)), rows)) * scale + rng.standard_normal() * scale
        for value, share in ((-np.inf, 0.2), (np.inf, 0.05), (np.nan, 0.05)):
            if trial % 3 == 0:
                draws[rng.random(draws.shape) < share] = value
        one, block = LogMeanExp(rows), LogMeanExp(rows)
        with np.errstate(all="ignore"):
            for row in draws[:1]:  # a draw already added before the blocks
                one.add(row)
                block.add(row)
            for row in draws[1:]:
                one.add(row)
            cut = int(rng.integers(1, len(draws) + 1))
            block.add_draws(draws[1:cut])
            block.add_draws(draws[cut:])
            assert block.count == one.count == len(draws)
            for got, want in ((block.total, one.total), (block.top, one.top), (block.value(), one.value())):
                assert np.array_equal(got, want, equal_nan=True), (trial, got, want)


def test_a_block_of_draws_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"draws must be \(K, 3\)"):
        LogMeanExp(3).add_draws(np.zeros((2, 4)))
