"""Each family's operations (sample, log-likelihood, encode, decode) as programs over its ONNX graphs."""

from __future__ import annotations

import importlib

from genserve.server.programs.base import Program

PROGRAMS: dict[str, str] = {
    "arcnn": "genserve.server.programs.autoregressive:CausalConvARProgram",
    "arrnn": "genserve.server.programs.autoregressive:RecurrentARProgram",
    "realnvp": "genserve.server.programs.flow:RealNVPProgram",
    "ppca": "genserve.server.programs.ppca:PPCAProgram",
    "vae": "genserve.server.programs.vae:VAEProgram",
    "gan": "genserve.server.programs.gan:GANProgram",
    "ebm": "genserve.server.programs.energy:EnergyProgram",
}


def program_class(model: str) -> type[Program]:
    """The program class for a model name (the manifest's ``model`` field)."""
    if model not in PROGRAMS:
        raise ValueError(f"no serving program for model {model!r}; known: {', '.join(PROGRAMS)}")
    module, cls = PROGRAMS[model].split(":")
    return getattr(importlib.import_module(module), cls)
