"""Build a user's module for export: ``package.module:build`` factories, data specs from JSON, weights-only loading.

    genserve export --factory mypkg.flows:build --family flow --spec spec.json --weights flow.pt --repo models

The factory is a callable (a function or a class) that returns an ``nn.Module``; it is called with the
DataSpec when it takes an argument, else with none. Weights are a ``state_dict`` saved with ``torch.save``
and read with ``torch.load(weights_only=True)``: a file holding pickled objects is refused, never executed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

from genserve.core.spec import DataSpec


def load_factory(target: str) -> Any:
    """The callable named by ``package.module:attr`` (``attr`` may be dotted); ValueError saying what failed."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--factory {target!r}: write it as package.module:callable, e.g. mypkg.flows:build")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--factory {target!r}: module {module_name!r} does not import ({e}); is its package "
                         "installed or on PYTHONPATH?") from None
    except Exception as e:  # the module's own code failed while importing
        raise ValueError(f"--factory {target!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            have = sorted(n for n in dir(obj) if not n.startswith("_"))[:12]
            raise ValueError(f"--factory {target!r}: {module_name!r} has no attribute {attr!r} (it has "
                             f"{', '.join(have)}{', ...' if len(have) == 12 else ''})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--factory {target!r} is a {type(obj).__name__}, not a function or class that builds "
                         "the module")
    return obj


def build_module(factory: Any, spec: DataSpec, target: str = "factory") -> Any:
    """Call ``factory(spec)`` or ``factory()`` and check that it returned an ``nn.Module``."""
    from torch import nn

    try:
        params = [p for p in inspect.signature(factory).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins without a signature: call without arguments
        params = []
    try:
        module = factory(spec) if params else factory()
    except Exception as e:  # the user's factory failed: say so with its error
        raise ValueError(f"--factory {target}: calling it raised {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"--factory {target} returned a {type(module).__name__}; it must return a torch.nn.Module")
    return module


def load_weights(module: Any, path: str | Path) -> None:
    """Load a ``state_dict`` file into ``module`` (weights only); ValueError for pickles or mismatched keys."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" such as {found.group(1)}" if found else ""
        raise ValueError(f"--weights {path} holds pickled Python objects{what}, which genserve never loads (they "
                         "could run code); save the weights alone with torch.save(model.state_dict(), path)") from None
    except Exception as e:  # not a torch file at all
        raise ValueError(f"--weights {path} is not a torch weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a genserve or Lightning-style checkpoint: take its weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {path} is not a state_dict (a mapping of names to tensors)")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match: the factory built another architecture or data size
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:3])
        raise ValueError(f"--weights {path} does not fit the module built by the factory ({detail[:300]}); "
                         "does --spec / --data describe the data it was trained on?") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"--weights {path} does not fit the module built by the factory: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def read_spec(path: str | Path) -> DataSpec:
    """A DataSpec from a JSON file (the keys of ``DataSpec``: name, shape, kind, levels, mean, std, ...)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"--spec {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--spec {path}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--spec {path}: expected a JSON object like "
                         '{"name": "moons", "shape": [2], "kind": "continuous"}')
    known = set(DataSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"--spec {path}: unknown keys {unknown}; a data spec has {sorted(known)}")
    try:
        return DataSpec.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--spec {path}: {e}") from None
