"""Test-split NLL of a dequantised model (realnvp, pPCA) with K draws: the old mean of log p(x + u_k) against the
log-mean-exp bound, both from the same draws, and the served number (the flow/pPCA program over the exported
ONNX graphs) against the PyTorch one.

    python scripts/dequant_bound.py quickstart/checkpoints/realnvp.pt \
        --served quickstart/model_repository/digits-realnvp/1 --draws 1 16 256

Prints one JSON line per K: nll_mean_nats, nll_logmeanexp_nats (PyTorch), nll_served_nats and the largest
per-row |served - PyTorch| (nats). Scoring noise: Noise(seed), the whole test split as one request.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from genserve.core.bounds import LogMeanExp
from genserve.core.manifest import MANIFEST, read_manifest
from genserve.core.noise import Noise
from genserve.server.programs import program_from_manifest
from genserve.server.programs.base import run_sync
from genserve.server.sessions import DirectRunner
from genserve.training.checkpoint import load_checkpoint
from genserve.training.data import load_dataset


def draws_of(model, x: torch.Tensor, seed: int, k: int) -> np.ndarray:
    """(k, N) float64 log p(x + u_k) in the documented noise order (k times noise.uniform(N, D))."""
    noise, rows = Noise(seed), []
    with torch.no_grad():
        for _ in range(k):
            u = torch.from_numpy(noise.uniform(x.shape[0], model.dim))
            lp = model.transform(x, u)[1] if hasattr(model, "transform") else model.log_density(x, u)
            rows.append(lp.double().numpy())
    return np.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--served", help="the exported version folder of the same checkpoint")
    p.add_argument("--draws", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, ckpt = load_checkpoint(args.checkpoint)
    model.eval()
    cfg = ckpt.get("config") or {}
    data = load_dataset(cfg.get("dataset", model.spec.name), seed=int(cfg.get("seed", 0)))
    x = torch.as_tensor(np.asarray(data.test, dtype=np.float32))
    served = None
    if args.served:
        folder = Path(args.served)
        manifest = read_manifest(folder / MANIFEST)
        program = program_from_manifest(manifest)
        runner = DirectRunner.from_files({g.name: folder / g.file for g in manifest.graphs})
        served = (program, runner)
    for k in args.draws:
        t0 = time.perf_counter()
        d = draws_of(model, x, args.seed, k)
        bound = LogMeanExp(d.shape[1])
        for row in d:
            bound.add(row)
        lme = bound.value()
        with torch.no_grad():
            evaluated = model.log_prob(x, Noise(args.seed), draws=k).double().numpy()
        out = {"checkpoint": args.checkpoint, "K": k, "n_test": len(x), "nll_mean_nats": float(-d.mean()),
               "nll_logmeanexp_nats": float(-lme.mean()),
               "log_prob_vs_logmeanexp_max_abs": float(np.abs(evaluated - lme).max())}
        if served:
            program, runner = served
            got = np.asarray(run_sync(program.log_likelihood(runner, x.numpy(), Noise(args.seed), draws=k)),
                             dtype=np.float64)
            out["nll_served_nats"] = float(-got.mean())
            out["served_vs_pytorch_max_abs_nats"] = float(np.abs(got - evaluated).max())
        out["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
