"""Each family's operations (sample, log-likelihood, encode, decode) as programs over its ONNX graphs.

A program is chosen by the manifest's ``family``: the family contract (docs/contract.md) fixes the graphs a
model of that family exports, whoever wrote the model, so one program serves the built-ins and users' models.
"""

from __future__ import annotations

import importlib

from genserve.server.programs.base import GraphSignature, Program

PROGRAMS: dict[str, str] = {
    "autoregressive": "genserve.server.programs.autoregressive:AutoregressiveProgram",
    "flow": "genserve.server.programs.flow:FlowProgram",
    "latent_variable": "genserve.server.programs.vae:VAEProgram",
    "linear_gaussian": "genserve.server.programs.ppca:PPCAProgram",
    "implicit": "genserve.server.programs.gan:GANProgram",
    "energy": "genserve.server.programs.energy:EnergyProgram",
}
COMPOSITES: dict[str, str] = {"mixture": "genserve.server.programs.mixture:MixtureProgram"}
"""Programs over other families' programs (not a family a module implements, so not in the family contract):
their manifests list members, built by ``program_from_manifest``."""
LEGACY = {("latent_variable", "ppca"): "linear_gaussian"}
"""Manifests written before the shared family table called pPCA ``latent_variable``: (family, model) -> family."""


def program_class(family: str, model: str = "") -> type[Program]:
    """The program class for a manifest's family (and, for old manifests, its model name)."""
    family = LEGACY.get((family, model), family)
    known = {**PROGRAMS, **COMPOSITES}
    if family not in known:
        raise ValueError(f"no serving program for family {family!r}; known: {', '.join(known)}")
    module, cls = known[family].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["COMPOSITES", "GraphSignature", "PROGRAMS", "Program", "program_class", "program_from_manifest",
           "signatures"]


def signatures(graphs) -> dict[str, GraphSignature]:
    """GraphSignatures of a manifest's GraphSpecs (or anything with name, inputs[name, shape], outputs[name])."""
    return {g.name: GraphSignature({t.name: tuple(t.shape) for t in g.inputs}, tuple(t.name for t in g.outputs))
            for g in graphs}


def program_from_manifest(manifest) -> Program:
    """The family program of a ModelManifest, over its data spec, parameters and graph signatures (a mixture's:
    over its members' programs, genserve.server.programs.mixture)."""
    from genserve.core.manifest import spec_from_proto

    if manifest.family in COMPOSITES:
        from genserve.server.programs.mixture import mixture_from_manifest

        return mixture_from_manifest(manifest)

    cls = program_class(manifest.family, manifest.model)
    return cls(spec_from_proto(manifest.data), dict(manifest.parameters), signatures(manifest.graphs))
