"""Optional float16 copy of a graph for GPU serving, checked against PyTorch with a stated tolerance.

The conversion is onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types=True``: weights
and arithmetic are float16, inputs and outputs stay float32, so the server feeds both variants alike.

Tolerance: on the real inputs of the parity check (export/parity.py) at batch sizes 1, 7 and 64,
``max |fp16 - PyTorch| <= FP16_RTOL * (1 + max |PyTorch|)`` per output, FP16_RTOL = 1e-2. float16 keeps
11 significant bits (relative step 4.9e-4), so 1e-2 leaves room for rounding accumulated over a few layers
while still catching a broken conversion (overflow past 65504, a wrong cast). Random inputs are not used:
their raw log-densities may leave float16's range, which says nothing about serving real data.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from genserve.export.parity import BATCH_SIZES, ParityError, onnx_session, take_rows, torch_outputs
from genserve.server.programs.base import Feeds
from genserve.training.base import GraphDef

FP16_RTOL = 1e-2
MAX_BLOCKED = 5  # op types kept in float32 before giving up


@dataclass
class Fp16Graph:
    path: Path
    max_rel_error: float
    """Worst max|fp16 - PyTorch| / (1 + max|PyTorch|) over outputs and batch sizes."""
    tolerance: float = FP16_RTOL
    float32_ops: list[str] = field(default_factory=list)
    """Op types the conversion kept in float32 (besides onnxconverter-common's default block list)."""


def convert_fp16(src: str | Path, dst: str | Path) -> list[str]:
    """Write a float16 copy of the ONNX file ``src`` to ``dst`` (float32 inputs and outputs kept).

    Returns the op types kept in float32: where the converter leaves a node's types inconsistent (e.g. a
    ``Pow`` whose exponent stays float32), that op type is added to its block list and the conversion is
    retried. ValueError when it still fails.
    """
    try:
        from onnxconverter_common import float16
    except ModuleNotFoundError:
        raise ValueError("--fp16 needs onnxconverter-common: pip install onnxconverter-common") from None
    blocked: list[str] = []
    for _ in range(MAX_BLOCKED + 1):
        model = onnx.load(str(src))
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # "values clipped to float16 range" notices; parity decides
                half = float16.convert_float_to_float16(
                    model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + blocked)
            onnx.checker.check_model(half, full_check=True)
        except Exception as e:  # converter and checker raise several types; the message names the op
            op = re.search(r"op_type:\s*(\w+)", str(e))
            if op is None or op.group(1) in blocked:
                raise ValueError(f"float16 conversion of {Path(src).name} failed: {str(e).splitlines()[0][:300]}") \
                    from None
            blocked.append(op.group(1))
            continue
        onnx.save(half, str(dst))
        return blocked
    raise ValueError(f"float16 conversion of {Path(src).name} failed with {blocked} kept in float32")


def export_fp16(src: str | Path, dst: str | Path, graph: GraphDef, input_sets: dict[str, Feeds],
                rtol: float = FP16_RTOL, seed: int = 0) -> Fp16Graph:
    """Convert ``src`` to float16 at ``dst`` and check it against ``graph.module`` (ParityError if off)."""
    dst = Path(dst)
    blocked = convert_fp16(src, dst)
    session = onnx_session(dst)
    names = [o.name for o in session.get_outputs()]
    pool = input_sets.get("real") or next(iter(input_sets.values()))
    rng = np.random.default_rng(seed)
    worst = 0.0
    gname = Path(src).stem
    for b in BATCH_SIZES:
        feeds = take_rows(pool, b, rng)
        got = session.run(names, feeds)
        want = torch_outputs(graph, feeds)
        for out_name, g, w in zip(names, got, want, strict=True):
            rel = float(np.abs(g.astype(np.float64) - w).max() / (1 + np.abs(w).max())) if w.size else 0.0
            if not rel <= rtol:  # also catches NaN from float16 overflow
                dst.unlink(missing_ok=True)
                raise ParityError(f"fp16 graph {gname!r} output {out_name!r} at batch {b}: "
                                  f"max|fp16 - PyTorch| / (1 + max|PyTorch|) = {rel:.3g} > {rtol:g}")
            worst = max(worst, rel)
    return Fp16Graph(dst, worst, rtol, blocked)
