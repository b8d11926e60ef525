"""Dequantised scoring (flow, pPCA): all draws of a request in one submission, the same numbers as draw by draw."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.core.noise import Noise
from genserve.server.programs import base
from genserve.server.programs.base import dequantised_log_prob, run_sync


def graph(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in density whose rows depend on x and u non-linearly (so a mixed-up row or draw shows)."""
    x = feeds["x"].reshape(len(feeds["x"]), -1)
    return {"log_prob": (np.sin(x * 1.3 + feeds["u"] * 7.0) * np.arange(1, x.shape[1] + 1)).sum(axis=1)
            .astype(np.float32)}


def one_draw_at_a_time(x: np.ndarray, seed: int, draws: int) -> np.ndarray:
    noise, total = Noise(seed), np.zeros(len(x), dtype=np.float64)
    for _ in range(draws):
        total += graph({"x": x, "u": noise.uniform(len(x), 64)})["log_prob"]
    return (total / draws).astype(np.float32)


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
