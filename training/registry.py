"""Model names to classes, imported lazily so that listing models costs nothing."""

from __future__ import annotations

import importlib

from genserve.training.base import GenerativeModel

MODELS: dict[str, str] = {
    "arcnn": "genserve.training.arcnn:CausalConvAR",
    "arrnn": "genserve.training.arrnn:RecurrentAR",
    "realnvp": "genserve.training.realnvp:RealNVP",
    "ppca": "genserve.training.ppca:PPCA",
    "vae": "genserve.training.vae:VAE",
    "gan": "genserve.training.gan:GAN",
    "ebm": "genserve.training.ebm:EnergyModel",
}


def model_class(name: str) -> type[GenerativeModel]:
    """The class for a model name; ValueError listing the choices for an unknown one."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)
