"""Training configuration: one validated dataclass, built from profile, config file and overrides."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PROFILES = ("quick", "full")


@dataclass
class TrainConfig:
    """Everything that decides a training run; stored in the checkpoint so a run can be repeated."""

    model: str
    """A built-in (arcnn, arrnn, realnvp, ppca, vae, gan, ebm), a plugin's entry-point name, or with ``factory``
    the class's own ``name``."""
    factory: str = ""
    """``package.module:Class`` (or a function returning the class) to train instead of a registered model."""
    dataset: str = "digits"
    """Built-in set (digits, moons, gmm) or a .npy/.npz/.csv path."""
    levels: int = 0
    """Integer levels of a user data file (0: continuous rows)."""
    profile: str = "quick"
    """Settings preset: quick (minutes for all seven models) or full (best quality)."""
    seed: int = 0
    """Seeds weights, shuffling, dropout and every noise draw."""
    epochs: int = 20
    """Upper bound on passes over the training split."""
    batch_size: int = 64
    """Examples per optimisation step (per process under torchrun)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0: no clipping)."""
    patience: int = 10
    """Stop after this many epochs without a better validation criterion."""
    max_minutes: float = 0.0
    """Stop after this much wall time (0: no limit); the best checkpoint so far is kept."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model's constructor (its architecture)."""

    def __post_init__(self) -> None:
        from genserve.training.registry import is_known, model_class

        if not self.factory and not is_known(self.model):
            model_class(self.model)  # raises, naming the choices
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of: {', '.join(PROFILES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if min(self.weight_decay, self.grad_clip, self.max_minutes, self.levels, self.threads) < 0:
            raise ValueError("weight_decay, grad_clip, max_minutes, levels and threads must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Type-check an override against the field's current value; strings from the CLI are parsed."""
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{key}={value!r}: expected {type(current).__name__}") from None
    if isinstance(current, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(current, bool):
            raise ValueError(f"{key}={value!r}: expected {type(current).__name__}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"{key}={value!r}: expected {type(current).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Merge ``overrides`` into ``base``; unknown keys are refused, ``arch.*`` keys go to the model."""
    names = {f.name for f in fields(TrainConfig)}
    out = {**base, "arch": dict(base.get("arch", {}))}
    for key, value in overrides.items():
        if key == "arch":
            if not isinstance(value, dict):
                raise ValueError(f"{where}: arch must be a table of model arguments")
            for k, v in value.items():
                out["arch"][k] = _coerce(f"arch.{k}", v, out["arch"].get(k)) if k in out["arch"] else v
        elif key.startswith("arch."):
            k = key[5:]
            out["arch"][k] = _coerce(key, value, out["arch"][k]) if k in out["arch"] else _parse_loose(value)
        elif key in names:
            default = out.get(key, getattr(TrainConfig, key, None))
            out[key] = _coerce(key, value, default) if default is not None else value
        else:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names - {'arch'}))}, arch.*")
    return out


def _parse_loose(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .toml or .json file (the same keys as the overrides)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path}: {e}") from None
    raise ValueError(f"config file {path}: use .toml or .json")


def build_config(model: str | None, dataset: str = "digits", profile: str = "quick", levels: int = 0,
                 config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 factory: str | None = None) -> TrainConfig:
    """Profile defaults of the model (digits or tabular), then the config file, then overrides. The model is a
    registered name (built-in or plugin) or, with ``factory`` ("package.module:Class"), a class of the user's."""
    from genserve.training.registry import resolve

    cls = resolve(model, factory)
    model = cls.name if factory else model
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    from genserve.training.data import IMAGES  # image data sets get the image presets

    tabular = dataset not in IMAGES and not levels
    preset = (cls.tabular_profiles if tabular and cls.tabular_profiles else cls.profiles).get(profile, {})
    base = apply_overrides({"model": model, "factory": factory or "", "dataset": dataset, "profile": profile,
                            "levels": levels},
                           preset, f"{model} profile {profile}")
    if config_file:
        base = apply_overrides(base, read_config_file(config_file), str(config_file))
    if overrides:
        base = apply_overrides(base, overrides, "override")
    return TrainConfig(**base)
