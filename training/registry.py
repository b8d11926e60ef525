"""Model names to classes: the seven built-ins, then plugins of entry-point group ``genserve.models``, lazily.

A plugin is a ``GenerativeModel`` subclass in any installed distribution that declares, in its pyproject.toml,

    [project.entry-points."genserve.models"]
    tinyflow = "my_package.model:TinyFlow"

after which ``genserve train tinyflow`` trains it like a built-in. ``--factory my_package.model:TinyFlow`` (a
class, or a function returning one) trains a class that is not registered. Nothing is imported until a model is
asked for; a checkpoint records how its class was found (``origin``) so that evaluation, export and resume
rebuild it the same way (``class_from_origin``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from genserve.training.base import LIKELIHOOD_KINDS, OPERATIONS, Capabilities, GenerativeModel

ENTRY_POINT_GROUP = "genserve.models"

MODELS: dict[str, str] = {
    "arcnn": "genserve.training.arcnn:CausalConvAR",
    "arrnn": "genserve.training.arrnn:RecurrentAR",
    "realnvp": "genserve.training.realnvp:RealNVP",
    "ppca": "genserve.training.ppca:PPCA",
    "vae": "genserve.training.vae:VAE",
    "gan": "genserve.training.gan:GAN",
    "ebm": "genserve.training.ebm:EnergyModel",
}
"""The built-in models (name -> "module:Class"); plugins never replace them."""

OPERATION_METHODS = {"log_likelihood": "log_prob", "sample": "sample", "encode": "encode", "decode": "decode"}
"""Operation -> the GenerativeModel method that computes it in PyTorch (evaluation, export's reference)."""

_ORIGINS: dict[type, dict[str, str]] = {}
"""Classes handed out by this module -> how they were found, recorded in checkpoints (see ``origin``)."""


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" of distribution {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}){where}"


def _scan() -> tuple[dict[str, importlib.metadata.EntryPoint], list[str]]:
    """Usable plugin entry points by name, and the messages of those refused; imports nothing."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        same = found.setdefault(ep.name, [])
        if all(e.value != ep.value for e in same):  # one distribution seen twice on sys.path is not a clash
            same.append(ep)
    plugins, refused = {}, []
    for name, eps in found.items():
        if name in MODELS:
            refused += [f"{_describe(ep)} is refused: {name!r} is a built-in model; register the plugin under "
                        "another name" for ep in eps]
        elif len(eps) > 1:
            refused.append(f"plugin name {name!r} is refused: it is claimed by "
                           f"{' and '.join(_describe(ep) for ep in eps)}; uninstall one or rename it")
        else:
            plugins[name] = eps[0]
    return plugins, refused


def plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plugin entry points by name (not imported); those refused are left out (see ``refused``)."""
    return _scan()[0]


def refused() -> list[str]:
    """Messages for installed plugin entry points that are ignored (a built-in's name, or claimed twice)."""
    return _scan()[1]


def model_names() -> list[str]:
    """Every name ``genserve train`` accepts: the built-ins, then the plugins in name order."""
    return [*MODELS, *sorted(plugins())]


def is_known(name: str) -> bool:
    """Whether ``name`` is a built-in or an installed plugin, without importing either."""
    return name in MODELS or name in _scan()[0]


def model_class(name: str) -> type[GenerativeModel]:
    """The class of a built-in or plugin model; ValueError listing the choices for an unknown name, or naming
    the entry point and the import error for a plugin that does not import."""
    if name in MODELS:
        module, cls = MODELS[name].split(":")
        found = getattr(importlib.import_module(module), cls)
        _ORIGINS.setdefault(found, {"model": name})
        return found
    available, ignored = _scan()
    if name not in available:
        extra = f"; plugins: {', '.join(sorted(available))}" if available else (
            f" (no plugins installed: none in entry-point group {ENTRY_POINT_GROUP})")
        why = "".join(f"; {m}" for m in ignored if repr(name) in m)
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}{extra}, or train your own "
                         f"class with --factory package.module:Class{why}")
    ep = available[name]
    try:
        obj = ep.load()
    except Exception as e:  # whatever the plugin's import raises, the user sees one line naming it
        raise ValueError(f"model plugin {name!r} could not be imported: {_describe(ep)} failed with "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    cls = checked_class(_called(obj, f"plugin {name!r} ({_describe(ep)})"), f"plugin {name!r} ({_describe(ep)})")
    _ORIGINS[cls] = {"entry_point": name, "value": ep.value}
    return cls


def import_factory(factory: str) -> type[GenerativeModel]:
    """The class named by ``"package.module:Class"``, or returned by ``"package.module:function"`` (called without
    arguments); ValueError for a string that does not import, a missing attribute, or not a GenerativeModel."""
    what = f"--factory {factory!r}"
    module, sep, attr = factory.partition(":")
    if not sep or not module.strip() or not attr.strip():
        raise ValueError(f"{what}: write package.module:Class (or package.module:function returning the class)")
    module, attr = module.strip(), attr.strip()
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ModuleNotFoundError, or whatever the module raises while importing
        hint = " (is it installed, or on PYTHONPATH?)" if isinstance(e, ModuleNotFoundError) else ""
        raise ValueError(f"{what}: module {module!r} does not import{hint}: {type(e).__name__}: "
                         f"{_first_line(e)}") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(mod) if not n.startswith("_"))
            raise ValueError(f"{what}: module {module!r} has no attribute {attr!r}; it defines "
                             f"{', '.join(names[:20]) or 'nothing public'}{' ...' if len(names) > 20 else ''}")
        obj = getattr(obj, part)
    cls = checked_class(_called(obj, what), what)
    _ORIGINS[cls] = {"factory": _importable_path(cls) or f"{module}:{attr}"}
    return cls


def resolve(model: str | None, factory: str | None = None) -> type[GenerativeModel]:
    """The class for a ``genserve train`` command line: a registered name or a factory string, not both."""
    if factory:
        cls = import_factory(factory)
        if model and model != cls.name:
            raise ValueError(f"give a model name or --factory, not both (got {model!r} and --factory {factory!r})")
        return cls
    if not model:
        raise ValueError(f"name a model ({', '.join(model_names())}) or give --factory package.module:Class")
    return model_class(model)


def origin(cls: type[GenerativeModel]) -> dict[str, str]:
    """How a checkpoint finds ``cls`` again: ``{"model": name}`` (built-in), ``{"entry_point": name, ...}``
    (plugin) or ``{"factory": "module:attr"}``; ValueError for a class that cannot be found by any."""
    if cls in _ORIGINS:
        return dict(_ORIGINS[cls])
    for name, path in MODELS.items():
        if f"{cls.__module__}:{cls.__qualname__}" == path:
            return {"model": name}
    path = _importable_path(cls)
    if path is None:
        raise ValueError(f"{cls.__qualname__} (module {cls.__module__}) cannot be found again from a checkpoint: "
                         "define it at the top level of an importable module, or register it as a plugin")
    return {"factory": path}


def class_from_origin(record: dict[str, Any] | None, model: str) -> type[GenerativeModel]:
    """The class a checkpoint was written from; ``record`` is its ``origin`` (absent in older checkpoints, whose
    ``model`` is a built-in name)."""
    if not record:
        return model_class(model)
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise ValueError(f"the checkpoint's model origin {record!r} is not a valid record")
    if "model" in record:
        if record["model"] not in MODELS:
            raise ValueError(f"the checkpoint names built-in model {record['model']!r}, which does not exist")
        return model_class(record["model"])
    if "entry_point" in record:
        name = record["entry_point"]
        if name not in MODELS and not is_known(name):
            raise ValueError(f"the checkpoint was trained with model plugin {name!r} ({record.get('value', '?')}), "
                             f"which is not installed: no entry point {name!r} in group {ENTRY_POINT_GROUP}; "
                             "install the package that provides it")
        return model_class(name)
    if "factory" in record:
        try:
            return import_factory(record["factory"])
        except ValueError as e:
            raise ValueError(f"the checkpoint was trained with {e}") from None
    raise ValueError(f"the checkpoint's model origin {record!r} names no model, entry_point or factory")


def checked_class(obj: Any, what: str) -> type[GenerativeModel]:
    """``obj`` if it is a GenerativeModel subclass with the class attributes training, evaluation and export
    read; ValueError saying what is missing otherwise."""
    if not (isinstance(obj, type) and issubclass(obj, GenerativeModel)):
        kind = obj.__qualname__ if isinstance(obj, type) else type(obj).__name__
        raise ValueError(f"{what} gives {kind}, not a subclass of genserve.training.base.GenerativeModel; a model "
                         "to train subclasses it (loss, profiles) and provides its family contract's methods")
    problems = []
    for attr, ok in (("name", lambda v: isinstance(v, str) and v.strip()),
                     ("family", lambda v: isinstance(v, str) and v.strip()),
                     ("likelihood_kind", lambda v: v in LIKELIHOOD_KINDS),
                     ("operations", lambda v: isinstance(v, tuple | list) and v and set(v) <= set(OPERATIONS)),
                     ("capabilities", lambda v: isinstance(v, Capabilities))):
        if not ok(getattr(obj, attr, None)):
            problems.append(f"{attr} (got {getattr(obj, attr, '<missing>')!r})")
    if not obj.closed_form and obj.loss is GenerativeModel.loss and obj.training_step is GenerativeModel.training_step:
        problems.append("loss(x) (not defined)")
    if problems:
        raise ValueError(f"{what}: {obj.__qualname__} lacks or has invalid class attributes/methods: "
                         f"{'; '.join(problems)}. Needed: name (str), family (str), likelihood_kind (one of "
                         f"{', '.join(LIKELIHOOD_KINDS)}), operations (a tuple from {', '.join(OPERATIONS)}), "
                         "capabilities (genserve.training.base.Capabilities), loss(x)")
    # Validation (log_prob), `genserve evaluate` and export's parity reference call the PyTorch operations.
    lacking = [f"{method} (for {op})" for op, method in OPERATION_METHODS.items()
               if op in obj.operations and getattr(obj, method) is getattr(GenerativeModel, method)]
    if lacking:
        raise ValueError(f"{what}: {obj.__qualname__} declares operations {', '.join(obj.operations)} but does not "
                         f"implement {', '.join(lacking)}; implement them in PyTorch with the family program's noise "
                         "order (docs/contract.md), or leave the operation out of `operations`")
    return obj


def _called(obj: Any, what: str) -> Any:
    """A class as it is; a function is called without arguments to give the class."""
    if isinstance(obj, type) or not callable(obj):
        return obj
    try:
        return obj()
    except Exception as e:
        raise ValueError(f"{what}: calling {getattr(obj, '__qualname__', obj)}() to get the model class failed "
                         f"with {type(e).__name__}: {_first_line(e)}") from None


def _importable_path(cls: type) -> str | None:
    """``module:qualname`` when importing it gives ``cls`` back (not for classes made inside a function)."""
    if "<locals>" in cls.__qualname__ or cls.__module__ in ("__main__", "builtins"):
        return None
    try:
        obj: Any = importlib.import_module(cls.__module__)
        for part in cls.__qualname__.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{cls.__module__}:{cls.__qualname__}" if obj is cls else None


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [""])[0])[:300]
