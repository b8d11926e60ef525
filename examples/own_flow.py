"""Serve your own model: a zuko flow trained here, exported with genserve's family contract, then served.

    python examples/own_flow.py --repo models        # trains a zuko MAF on two moons, exports models/moons-maf/1

The module below is all a user writes to bring a flow: ``transform`` (z and log p(x)) and, because a MAF's
inverse is a fixed-point loop, ``inverse_pass`` with the passes per stage. A coupling flow (zuko's RealNVP or
NICE) would give ``inverse(z)`` instead. genserve checks the contract (inverse inverts, log-determinant agrees
with autograd), exports the graphs, and the server runs the passes batched across requests.
"""

from __future__ import annotations

import argparse

import torch
import zuko
from torch import Tensor, nn


class ZukoFlow(nn.Module):
    """A zuko flow over D features under genserve's flow contract (docs/contract.md)."""

    def __init__(self, flow: zuko.flows.Flow) -> None:
        super().__init__()
        self.flow = flow

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, log p(x)): the flow's transform and its exact log-density in nats, as zuko's ``log_prob``."""
        dist = self.flow()
        z, ladj = dist.transform.call_and_ladj(x)
        return z, dist.base.log_prob(z) + ladj

    def inverse(self, z: Tensor) -> Tensor:
        """x = f^-1(z) for flows whose transforms invert in one pass (coupling flows)."""
        return self.flow().transform.inv(z)

    @property
    def stages(self) -> list[nn.Module]:
        """The flow's transforms in the order the inverse applies them (last first)."""
        return list(reversed(self.flow.transform.transforms))

    @property
    def inverse_passes(self) -> list[int]:
        return [int(t.passes) for t in self.stages]

    def inverse_pass(self, y: Tensor, x: Tensor, stage: int) -> Tensor:
        """One fixed-point pass of stage ``stage``'s inverse: x -> x_next towards f_stage^-1(y)."""
        return self.stages[stage].meta(None, x).inv(y)


class ZukoMAF(ZukoFlow):
    """A masked autoregressive flow: D sequential passes invert each transform, so no ``inverse``."""

    inverse = None  # the contract then takes inverse_pass


def train(flow: nn.Module, x: Tensor, steps: int = 600, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Maximum likelihood with Adam on full batches; a few seconds for 2-D data."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    for _ in range(steps):
        loss = -flow().log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()


def main() -> None:
    from genserve.export.repository import export_model
    from genserve.training.data import load_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default="models", help="model repository folder")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    args = p.parse_args()
    data = load_dataset("moons", seed=0)
    flow = train(zuko.flows.MAF(2, transforms=3, hidden_features=(64, 64)), torch.as_tensor(data.train), args.steps)
    spec = {**data.spec.to_dict(), "mean": [], "std": []}  # zuko sees raw values: no normalisation inside
    export_model(ZukoMAF(flow), "flow", spec, args.repo, name="moons-maf", data=data.test, model_name="zuko-maf",
                 force=True)


if __name__ == "__main__":
    main()
