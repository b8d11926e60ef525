"""The data spec: shape, domain and normalisation of a data set, carried from training to serving."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Kind = Literal["discrete", "continuous"]


@dataclass(frozen=True)
class DataSpec:
    """What one example looks like; every station needs it to read, check and write data.

    Discrete data are integer levels 0..levels-1 (digits: 17 levels, 8x8 images). Continuous data are real
    rows; models normalise them internally with ``mean``/``std`` (taken from the training split), so every
    density is reported in the units of the raw data.

    Images are channels-last, ``(H, W)`` or ``(H, W, C)`` with C in 1..4, as numpy image arrays and PIL hold
    them: the row-major order of one example, in which every flat (D,) view and every autoregressive model
    reads it, is then the raster order over pixels with the channels of a pixel consecutive (R, G, B of a
    pixel before the next pixel), which is PixelCNN's order.
    """

    name: str
    """Data set name (``digits``, ``moons``, ``gmm`` or a file stem)."""
    shape: tuple[int, ...]
    """Shape of one example: ``(8, 8)`` for digit images, ``(D,)`` for tabular rows."""
    kind: Kind
    """``discrete`` (integer levels) or ``continuous`` (real values)."""
    levels: int = 0
    """Number of integer levels for discrete data (values 0..levels-1); 0 for continuous data."""
    low: float = -math.inf
    """Smallest valid value (0 for discrete data)."""
    high: float = math.inf
    """Largest valid value (levels-1 for discrete data)."""
    mean: tuple[float, ...] = field(default_factory=tuple)
    """Per-feature mean used to normalise continuous data (empty for discrete data)."""
    std: tuple[float, ...] = field(default_factory=tuple)
    """Per-feature standard deviation used to normalise continuous data."""
    columns: tuple[str, ...] = field(default_factory=tuple)
    """Names of the D features of tabular rows (a file's header), in order; empty when the data have none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "columns", tuple(self.columns))
        if any(s <= 0 for s in self.shape) or not self.shape:
            raise ValueError(f"shape must be non-empty with positive sizes, got {self.shape}")
        if self.columns:
            if len(self.shape) != 1 or len(self.columns) != self.dim:
                raise ValueError(f"columns name the features of rows (D,): got {len(self.columns)} names for "
                                 f"shape {self.shape}")
            bad = [c for c in self.columns if not isinstance(c, str) or not c.strip()]
            if bad:
                raise ValueError(f"column names must be non-empty strings, got {bad[0]!r}")
            seen: set[str] = set()
            dup = next((c for c in self.columns if c in seen or seen.add(c)), None)
            if dup is not None:
                raise ValueError(f"column name {dup!r} appears twice; column names must be unique")
        if self.kind not in ("discrete", "continuous"):
            raise ValueError(f"kind must be 'discrete' or 'continuous', got {self.kind!r}")
        if self.kind == "discrete":
            if self.levels < 2:
                raise ValueError(f"discrete data need levels >= 2, got levels={self.levels}")
            if (self.low, self.high) != (0.0, float(self.levels - 1)):
                object.__setattr__(self, "low", 0.0)
                object.__setattr__(self, "high", float(self.levels - 1))
        else:
            if self.levels:
                raise ValueError(f"continuous data have no levels, got levels={self.levels}")
            for name in ("mean", "std"):
                values = getattr(self, name)
                if values and len(values) != self.dim:
                    raise ValueError(f"{name} has {len(values)} entries but one example has {self.dim} values")
            if self.std and min(self.std) <= 0:
                raise ValueError(f"std must be positive, got {self.std}")

    @property
    def dim(self) -> int:
        """Number of values in one example (D in bits per dimension)."""
        return math.prod(self.shape)

    @property
    def is_image(self) -> bool:
        """True for images, (H, W) or channels-last (H, W, C) with C in 1..4: they get image grids and
        convolutional models; other shapes are treated as flat rows of D values."""
        return len(self.shape) == 2 or (len(self.shape) == 3 and 1 <= self.shape[2] <= 4)

    @property
    def channels(self) -> int:
        """Channels per pixel of an image: C for (H, W, C), 1 for (H, W); 0 for data that are not images."""
        if not self.is_image:
            return 0
        return self.shape[2] if len(self.shape) == 3 else 1

    @property
    def discrete(self) -> bool:
        return self.kind == "discrete"

    def check(self, x: np.ndarray, what: str = "x") -> None:
        """Raise ValueError naming the first problem of a batch ``x`` of shape (N, *shape), if any."""
        x = np.asarray(x)
        if x.ndim == len(self.shape) and tuple(x.shape) == self.shape:
            raise ValueError(f"{what} has shape {tuple(x.shape)}: add a batch axis, e.g. shape (1, *{self.shape})")
        if tuple(x.shape[1:]) != self.shape:
            need = ", ".join(map(str, self.shape))
            raise ValueError(f"{what} has shape {tuple(x.shape)} but this data needs (N, {need})")
        if x.shape[0] == 0:
            raise ValueError(f"{what} is empty: send at least one row")
        if x.dtype.kind not in "fiu":  # real numbers: floats and integers (not bool, complex or objects)
            raise ValueError(f"{what} has dtype {x.dtype}; send real numbers (float32 or integers)")
        flat = x.reshape(x.shape[0], -1)
        # Fast path, one pass: every value in the domain (NaN fails every comparison). Only a batch that
        # fails it pays for the checks below, which find and name the first bad row.
        if self.discrete:  # each value equals its nearest level (NaN and infinities equal none)
            nearest = np.rint(flat)
            if np.equal(np.minimum(np.maximum(nearest, 0, out=nearest), self.levels - 1, out=nearest), flat).all():
                return
        elif ((flat >= self.low) & (flat <= self.high) & np.isfinite(flat)).all():
            return
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise ValueError(f"{what} row {int(np.argmax(bad))} has NaN or infinite values; remove or impute them")
        if self.discrete:
            out = (flat < 0) | (flat > self.levels - 1) | (flat != np.round(flat))
            if out.any():
                row, col = np.argwhere(out)[0]
                raise ValueError(
                    f"{what} row {row} value {float(flat[row, col]):g} is not an integer level in 0..{self.levels - 1}"
                )
        else:
            out = (flat < self.low) | (flat > self.high)
            if out.any():
                row, col = np.argwhere(out)[0]
                raise ValueError(
                    f"{what} row {row} value {float(flat[row, col]):g} is outside [{self.low}, {self.high}]"
                )

    def postprocess(self, x: np.ndarray) -> np.ndarray:
        """Map model output to the data domain: round and clip discrete values to the levels."""
        x = np.asarray(x, dtype=np.float32)
        if self.discrete:
            return np.clip(np.rint(x), 0, self.levels - 1).astype(np.float32)
        return x

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.columns:
            d["columns"] = list(self.columns)
        else:  # the dict of a spec without names stays as it was before columns existed
            del d["columns"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
