"""ONNX Runtime sessions: provider chosen at run time (CUDA when it really loads, else CPU), thread settings.

onnxruntime-gpu lists CUDA among the available providers even where no GPU exists, so the only reliable
check is to create the session and read back ``session.get_providers()``.

A row's outputs do not depend on the rows it is batched with (seeded answers are bit-identical under any
load): on the CPU, graphs are rewritten at load where ONNX Runtime's kernels would round a row differently
by its place in the batch (``graph_rewrite``); a graph the rewrite could not fully fix has its calls padded to
a multiple of ``ROW_MULTIPLE`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from genserve.server.graph_rewrite import row_independent_model
from genserve.server.programs.base import Feeds

ROW_MULTIPLE = 4
"""Calls of a graph with tail-sensitive nodes the rewrite could not fix run on a multiple of this many rows
(copies of the first row, cut off again): the 4-float SIMD packet of ONNX Runtime's Eigen kernels (SSE, NEON),
so that no element of a real row falls in a kernel's scalar tail."""


class Session(ort.InferenceSession):
    """An InferenceSession that knows how many rows its CPU calls must be padded to (1: none)."""

    def __init__(self, model: str | bytes, sess_options: ort.SessionOptions, providers: list[str],
                 row_multiple: int = 1) -> None:
        super().__init__(model, sess_options=sess_options, providers=providers)
        self.row_multiple = row_multiple


@dataclass(frozen=True)
class SessionOptions:
    """How graphs are run; one per server, overridable per model."""

    provider: str = "auto"
    """``auto`` (CUDA if it loads, else CPU), ``cuda`` (fail without a GPU) or ``cpu``."""
    intra_op_threads: int = 1
    """Threads inside one ONNX Runtime call; 1-2 keeps p99 low under concurrency on small CPUs."""
    inter_op_threads: int = 1
    """Threads across independent graph nodes."""
    spinning: bool = False
    """Let idle ORT threads spin; helps a lone client's latency, hurts p99 under load."""

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "cuda", "cpu"):
            raise ValueError(f"provider must be auto, cuda or cpu, got {self.provider!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError(f"thread counts must be >= 0 (0: ORT default), got {self.intra_op_threads}, "
                             f"{self.inter_op_threads}")


def make_session(path: str | Path, opts: SessionOptions = SessionOptions()) -> Session:
    """A session for one graph, rewritten for row independence; RuntimeError when CUDA was demanded but did
    not load."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.log_severity_level = 3  # CUDA fallback errors are expected on CPU machines; we report providers instead
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if opts.spinning else "0")
    providers = ["CPUExecutionProvider"]
    if opts.provider in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    original = Path(path).read_bytes()
    rewrite = row_independent_model(original)
    # An unchanged graph is opened from its file, as before (ONNX Runtime resolves external data from its path).
    model = str(path) if rewrite.model is original else rewrite.model
    session = Session(model, so, providers, ROW_MULTIPLE if rewrite.unfixed else 1)
    if opts.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"{path}: CUDA was requested but ONNX Runtime could not load it; use provider auto or cpu")
    return session


def uses_cuda(session: ort.InferenceSession) -> bool:
    return session.get_providers()[0] == "CUDAExecutionProvider"


def run_session(session: Session | ort.InferenceSession, feeds: Feeds, names: list[str] | None = None,
                cuda: bool | None = None) -> Feeds:
    """One call; with CUDA the inputs and outputs go through I/O binding (one copy each way). ``names`` (the
    session's outputs) and ``cuda`` (``uses_cuda(session)``) may be given by a caller that cached them.

    On the CPU, a session made by ``make_session`` that asks for it has its rows (axis 0 of every input) padded
    to a multiple of its ``row_multiple`` and the outputs cut back (see the module docstring)."""
    names = [o.name for o in session.get_outputs()] if names is None else names
    feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
    if uses_cuda(session) if cuda is None else cuda:
        binding = session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for n in names:
            binding.bind_output(n, "cuda")
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
    multiple = session.row_multiple if isinstance(session, Session) else 1
    if multiple == 1:
        return dict(zip(names, session.run(names, feeds), strict=True))
    rows = {v.shape[0] if v.ndim else -1 for v in feeds.values()}
    n = rows.pop() if len(rows) == 1 else 0
    pad = -n % multiple if n > 0 else 0
    if not pad:
        return dict(zip(names, session.run(names, feeds), strict=True))
    feeds = {k: np.concatenate([v, np.broadcast_to(v[:1], (pad, *v.shape[1:]))]) for k, v in feeds.items()}
    outputs = session.run(names, feeds)
    return {k: v[:n] if v.ndim and v.shape[0] == n + pad else v for k, v in zip(names, outputs, strict=True)}


class DirectRunner:
    """``await runner(graph, feeds)`` straight into ONNX Runtime, no batching (export parity, benchmarks)."""

    def __init__(self, sessions: dict[str, ort.InferenceSession]) -> None:
        self.sessions = sessions

    @classmethod
    def from_files(cls, files: dict[str, str | Path], opts: SessionOptions = SessionOptions()) -> DirectRunner:
        return cls({name: make_session(path, opts) for name, path in files.items()})

    async def __call__(self, graph: str, feeds: Feeds) -> Feeds:
        return run_session(self.sessions[graph], feeds)
