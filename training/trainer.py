"""The training loop: seeded, resumable, early-stopped, with a progress bar; runs alone or under torchrun.

    genserve train vae --dataset digits --out runs/vae.pt              # one process
    torchrun --standalone --nproc_per_node=2 -m genserve.training.cli vae --dataset digits --out runs/vae.pt

Under torchrun every process trains on its shard of each epoch (DistributedSampler) and gradients are
averaged: by DistributedDataParallel for single-loss families, and by an all-reduce before each optimizer
step for families with their own step (GAN, EBM). Rank 0 writes the checkpoint.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from genserve.core.spec import DataSpec
from genserve.training.base import GenerativeModel
from genserve.training.checkpoint import read_checkpoint, save_checkpoint
from genserve.training.config import TrainConfig
from genserve.training.data import Dataset, load_dataset
from genserve.training.registry import origin, resolve


def build_model(cfg: TrainConfig, spec: DataSpec) -> GenerativeModel:
    """The model of ``cfg`` (built-in, plugin or factory) for data ``spec``; unknown architecture arguments are
    refused by name."""
    cls = resolve(cfg.model, cfg.factory)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(cfg.arch) - set(params) - {"self", "spec"})
    if unknown:
        known = [p for p in params if p not in ("self", "spec")]
        raise ValueError(f"{cfg.model} has no architecture setting {unknown}; known: {', '.join(known)}")
    return cls(spec, **cfg.arch)


def code_revision() -> str:
    """The git commit of the code that trained (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _Dist:
    """Rank and world size from torchrun's environment; a no-op for one process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = self.world > 1 and not dist.is_initialized()
        if self.owned:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def close(self) -> None:
        """Destroy the process group this made, on every rank, as torch.distributed asks of a program before it
        ends (so no rank leaves while gloo's threads in another still talk to it)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
        self.owned = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def sync_buffers(self, model: torch.nn.Module) -> None:
        for b in model.buffers():
            dist.broadcast(b, 0)

    def max_weight_diff(self, model: torch.nn.Module) -> float:
        """Largest difference of any weight between ranks (0.0 when they are in step)."""
        flat = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values() if p.is_floating_point()])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        return max(float((g - gathered[0]).abs().max()) for g in gathered)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          data: Dataset | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` and write the best checkpoint to ``out``; returns the metrics.

    With ``resume`` an existing checkpoint at ``out`` continues from its last finished epoch; the result equals
    an uninterrupted run (shuffling and dropout are seeded per epoch). Under torchrun each rank calls it.
    """
    ddp = _Dist()
    try:
        return _train(ddp, cfg, out, resume, progress, data)
    finally:
        ddp.close()


def _train(ddp: _Dist, cfg: TrainConfig, out: str | Path, resume: bool, progress: bool,
           data: Dataset | None) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = data or load_dataset(cfg.dataset, seed=cfg.seed, levels=cfg.levels)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.spec)
    train_x, val_x = torch.as_tensor(data.train), torch.as_tensor(data.val)
    out = Path(out)
    start = time.perf_counter()
    meta = {"config": cfg.to_dict(), "code_revision": code_revision(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    if model.closed_form:
        model.fit_closed_form(train_x)
        model.eval()
        val = model.validation_loss(val_x)
        metrics = {"best_val": val, "epochs": 0, "train_seconds": time.perf_counter() - start}
        if ddp.main:
            save_checkpoint(out, model, metrics=metrics, history=[{"epoch": 0, "val": val}], **meta)
        return metrics

    optimizers = model.make_optimizers(cfg.lr, cfg.weight_decay)
    state: dict[str, Any] = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "history": [], "seconds": 0.0}
    best_weights = {k: v.clone() for k, v in model.state_dict().items()}
    if resume and out.exists():
        ckpt = read_checkpoint(out)
        mine = origin(type(model))
        theirs = ckpt.get("origin") or {"model": ckpt["model"]}
        if ckpt["model"] != model.name or _origin_key(theirs) != _origin_key(mine):
            raise ValueError(f"{out} holds a {ckpt['model']} model ({_origin_key(theirs)}), not {model.name} "
                             f"({_origin_key(mine)}); pick another --out")
        ts = ckpt["train_state"]
        model.load_state_dict(ts["current"])
        for opt, s in zip(optimizers, ts["optimizers"], strict=True):
            opt.load_state_dict(s)
        best_weights = ckpt["state_dict"]
        state = {k: ts[k] for k in state}
    if state["bad_epochs"] >= cfg.patience or state["epoch"] >= cfg.epochs:
        return dict(read_checkpoint(out)["metrics"])

    # The default step calls runner(x) for the loss: through DDP, so that gradients are averaged. A user's
    # module may mean something else by forward (a flow's x -> z), so the runner calls model.loss instead.
    runner: torch.nn.Module = _Loss(model)
    custom_step = type(model).training_step is not GenerativeModel.training_step
    if ddp.world > 1:
        ddp.sync_buffers(model)
        for p in model.parameters():
            dist.broadcast(p.data, 0)
        if custom_step:  # families with their own step: average gradients just before each update
            for opt in optimizers:
                params = [p for g in opt.param_groups for p in g["params"]]
                opt.register_step_pre_hook(lambda *_, params=params: ddp.average_grads(params))
        else:
            runner = torch.nn.parallel.DistributedDataParallel(runner)

    dataset = TensorDataset(train_x)
    stop_reason = "epochs"
    for epoch in range(state["epoch"], cfg.epochs):
        # Seeding per epoch makes a resumed run repeat the uninterrupted one exactly.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        np.random.seed((cfg.seed * 100_003 + epoch) % 2**32)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        sampler = None
        if ddp.world > 1:
            sampler = DistributedSampler(dataset, ddp.world, ddp.rank, shuffle=True, seed=cfg.seed)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                            generator=g, drop_last=len(dataset) > cfg.batch_size * max(ddp.world, 1))
        model.train()
        bar = tqdm(loader, desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   # None: no bar when stderr is not a terminal (a log file would fill with redraws)
                   disable=None if progress and ddp.main else True, file=sys.stderr, dynamic_ncols=True)
        running: dict[str, float] = {}
        t0 = time.perf_counter()
        for i, (xb,) in enumerate(bar):
            if custom_step:
                logs = model.training_step(xb, optimizers, cfg.grad_clip)
            else:
                logs = _default_step(runner, model, xb, optimizers, cfg.grad_clip)
            for k, v in logs.items():  # running mean over the epoch so far
                running[k] = running.get(k, 0.0) + (v - running.get(k, 0.0)) / (i + 1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        bar.close()
        if ddp.world > 1 and custom_step:
            ddp.sync_buffers(model)
        model.eval()
        val = model.validation_loss(val_x)
        state["seconds"] += time.perf_counter() - t0
        improved = val < state["best_val"] - 1e-4 * abs(state["best_val"]) if math.isfinite(state["best_val"]) else True
        if improved:
            state["best_val"], state["bad_epochs"] = val, 0
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "val": val, **running})
        if progress and ddp.main:
            mark = "*" if improved else " "
            losses = " ".join(f"{k} {v:.3f}" for k, v in running.items())
            print(f"{cfg.model} epoch {epoch + 1:3d}  {losses}  val {val:.3f}{mark}  ({state['seconds']:.0f}s)",
                  file=sys.stderr)
        if ddp.main:
            _write(out, model, best_weights, optimizers, state, meta)
        if state["bad_epochs"] >= cfg.patience:
            stop_reason = f"no better validation for {cfg.patience} epochs"
            break
        if cfg.max_minutes and state["seconds"] > 60 * cfg.max_minutes:
            stop_reason = f"time budget of {cfg.max_minutes} minutes"
            break
    metrics = {"best_val": state["best_val"], "epochs": state["epoch"], "train_seconds": state["seconds"],
               "stopped": stop_reason}
    if ddp.world > 1:
        metrics["ddp_world_size"] = ddp.world
        metrics["ddp_max_weight_diff"] = ddp.max_weight_diff(model)
    if ddp.main:
        _write(out, model, best_weights, optimizers, state, meta, metrics)
    if ddp.world > 1:
        dist.barrier()
    return metrics


def _origin_key(record: dict[str, str]) -> str:
    """The part of a checkpoint origin that names the class: "model vae", "entry_point tinyflow", ..."""
    return next((f"{k} {record[k]}" for k in ("model", "entry_point", "factory") if k in record), str(record))


class _Loss(torch.nn.Module):
    """``forward(x)`` is the model's training loss, whatever the model's own forward does."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x)


def _default_step(runner: torch.nn.Module, model: GenerativeModel, x: torch.Tensor,
                  optimizers: list[torch.optim.Optimizer], grad_clip: float) -> dict[str, float]:
    (opt,) = optimizers
    opt.zero_grad(set_to_none=True)
    loss = runner(x)  # _Loss: forward(x) is the training loss; through DDP this also averages gradients
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return {"loss": float(loss.detach())}


def _write(out: Path, model: GenerativeModel, best: dict, optimizers: list, state: dict, meta: dict,
           metrics: dict | None = None) -> None:
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best)
    save_checkpoint(out, model, metrics=metrics or {"best_val": state["best_val"], "epochs": state["epoch"]},
                    history=state["history"],
                    train_state={**state, "current": current, "optimizers": [o.state_dict() for o in optimizers]},
                    **meta)
    model.load_state_dict(current)
