"""Run a model's export graphs in PyTorch behind the serving programs' ``run`` interface (parity checks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from genserve.core.noise import Noise
from genserve.server.programs.base import Feeds, Program, run_sync
from genserve.training.base import GraphDef


class TorchRunner:
    """``await runner(graph, feeds)`` evaluates the PyTorch module of that graph; counts calls per graph.

    ``graphs`` are the contract's graphs (``export.contract.bind(...).graphs``), or a built-in model whose
    contract graphs are made here.
    """

    def __init__(self, graphs: dict[str, GraphDef] | Any) -> None:
        if not isinstance(graphs, dict):
            from genserve.export.contract import bind

            graphs = bind(graphs.eval(), graphs.family, graphs.spec).graphs
        self.graphs = graphs
        self.calls: dict[str, int] = {}

    async def __call__(self, graph: str, feeds: Feeds) -> Feeds:
        g = self.graphs[graph]
        missing = set(g.inputs) - set(feeds)
        if missing:
            raise KeyError(f"graph {graph!r} needs inputs {sorted(missing)}")
        self.calls[graph] = self.calls.get(graph, 0) + 1
        with torch.no_grad():
            out = g.module(*[torch.from_numpy(np.ascontiguousarray(feeds[k], dtype=np.float32)) for k in g.inputs])
        out = out if isinstance(out, tuple | list) else (out,)
        return {name: t.detach().numpy() for name, t in zip(g.outputs, out, strict=True)}


class ProgramModel:
    """The PyTorch reference of a user's module: its family program run over the PyTorch graphs.

    Gives ``check_operations`` the interface of a built-in model (``log_prob``, ``sample``, ``encode``,
    ``decode`` on tensors with a ``Noise``), so the served operations over ONNX Runtime are compared with the
    same operations over PyTorch, call for call.
    """

    def __init__(self, program: Program, runner: TorchRunner, bound: Any) -> None:
        self.program, self.runner = program, runner
        self.spec, self.operations = bound.spec, tuple(bound.operations)

    def log_prob(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run_sync(self.program.log_likelihood(self.runner, x.numpy(), noise))))

    def sample(self, n: int, noise: Noise) -> torch.Tensor:
        return torch.from_numpy(run_sync(self.program.sample(self.runner, n, noise)).x)

    def encode(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run_sync(self.program.encode(self.runner, x.numpy(), noise))))

    def decode(self, z: torch.Tensor, noise: Noise) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run_sync(self.program.decode(self.runner, z.numpy(), noise))))
