"""Checkpoints: config, architecture, data spec, weights and metrics, loadable with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genserve.core.spec import DataSpec
from genserve.training.base import GenerativeModel
from genserve.training.registry import class_from_origin, origin

FORMAT = "genserve-checkpoint/1"


def save_checkpoint(path: str | Path, model: GenerativeModel, **extra: Any) -> None:
    """Write the model with everything needed to rebuild it; ``extra`` holds config, metrics, state.

    ``origin`` says where the class comes from (a built-in name, a plugin's entry point or a factory string),
    so a plugin's checkpoint is rebuilt by ``load_checkpoint`` like a built-in's.
    """
    state = {
        "format": FORMAT,
        "model": model.name,
        "origin": origin(type(model)),
        "arch": dict(model.arch),
        "spec": model.spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True`` (no pickle of arbitrary objects)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `genserve train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign files
        first = (str(e).strip().splitlines() or [""])[0]
        why = first if len(first) > 8 else f"{type(e).__name__} {first}".strip()
        raise ValueError(f"{path} is not a readable genserve checkpoint (torch.load: {why}); "
                         "pass a file written by `genserve train`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a genserve checkpoint (format {FORMAT})")
    return ckpt


def checkpoint_class(ckpt: dict[str, Any]) -> type[GenerativeModel]:
    """The model class a checkpoint was written from (built-in, plugin or factory); ValueError if it is gone."""
    return class_from_origin(ckpt.get("origin"), str(ckpt.get("model")))


def load_checkpoint(path: str | Path) -> tuple[GenerativeModel, dict[str, Any]]:
    """Rebuild the model in eval mode from a checkpoint; returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model = checkpoint_class(ckpt)(DataSpec.from_dict(ckpt["spec"]), **ckpt["arch"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # weights saved by an older version of the model code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: the saved weights no longer fit the {ckpt['model']} code ({first[:200]}); "
                         "retrain it with `genserve train`") from None
    return model.eval(), ckpt
