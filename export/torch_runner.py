"""Run a model's export graphs in PyTorch behind the serving programs' ``run`` interface (parity checks)."""

from __future__ import annotations

import numpy as np
import torch

from genserve.server.programs.base import Feeds
from genserve.training.base import GenerativeModel


class TorchRunner:
    """``await runner(graph, feeds)`` evaluates the PyTorch module of that graph; counts calls per graph."""

    def __init__(self, model: GenerativeModel) -> None:
        self.graphs = model.eval().export_graphs()
        self.calls: dict[str, int] = {}

    async def __call__(self, graph: str, feeds: Feeds) -> Feeds:
        g = self.graphs[graph]
        missing = set(g.inputs) - set(feeds)
        if missing:
            raise KeyError(f"graph {graph!r} needs inputs {sorted(missing)}")
        self.calls[graph] = self.calls.get(graph, 0) + 1
        with torch.no_grad():
            out = g.module(*[torch.from_numpy(np.ascontiguousarray(feeds[k], dtype=np.float32)) for k in g.inputs])
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.detach().numpy() for name, t in zip(g.outputs, out, strict=True)}
