"""What `genserve score` writes beside each row: score kinds, calibrated percentiles, flags, and the rows to explain.

``ScoreColumns`` is decided once from the command's options and the model's manifest (which score kinds it
serves, which are calibrated), refusing what cannot work before any row is sent; then it turns each streamed
answer into the columns of its rows. ``WorstRows`` keeps the few most anomalous rows seen so far (for
``--explain``) in memory bounded by their count, whatever the file's size.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOG_PROB = "log_prob"


@dataclass(frozen=True)
class Kind:
    """A score kind as the manifest describes it."""

    name: str
    description: str
    higher_is_normal: bool
    per_batch: bool
    calibrated: bool


def model_kinds(manifest: Any) -> dict[str, Kind]:
    """log_prob and the manifest's score kinds (genserve.v1.ModelManifest), with whether each is calibrated."""
    calibrated = {c.score for c in manifest.calibration}
    kinds = {LOG_PROB: Kind(LOG_PROB, "log-likelihood in nats", True, False, LOG_PROB in calibrated)}
    for k in manifest.score_kinds:
        kinds[k.name] = Kind(k.name, k.description, k.higher_is_normal, k.per_batch, k.name in calibrated)
    return kinds


def _calibration_text(manifest: Any, name: str) -> str:
    for c in manifest.calibration:
        if c.score == name:
            return f"{c.rows} rows of {c.data}" if c.data else f"{c.rows} rows"
    return ""


@dataclass
class ScoreColumns:
    """The columns of `genserve score`'s table, and the request options that produce them.

    Columns, in order: the id columns, ``row``, ``log_prob_nats``, ``bits_per_dim`` (empty for unnormalized
    models), each requested score kind other than log_prob under its own name, ``percentile`` (of the first
    --score-kind, among the model's calibration data; low = anomalous) and ``percentile_<kind>`` for the
    others, then ``flag`` (--below-percentile) or ``outlier`` (--threshold / --quantile).
    """

    model: str
    kinds: list[Kind]
    """The requested kinds; the first is the one ``percentile``, ``flag`` and --explain go by."""
    percentile: bool
    below: float | None
    threshold: float | None
    calibration: str
    """Where the primary kind's calibration came from, for the summary line."""
    flagged: int = 0
    rows: int = 0
    log_prob_sum: float = 0.0
    bpd_sum: float = 0.0
    bpd_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def plan(cls, args: argparse.Namespace, name: str, version: int, manifest: Any) -> ScoreColumns:
        """Check the options against the model: kinds it serves, calibration for percentiles, image shape for
        --explain. Raises ValueError saying what to change."""
        served = model_kinds(manifest)
        wanted = list(dict.fromkeys(args.score_kind or [LOG_PROB]))
        unknown = [k for k in wanted if k not in served]
        if unknown:
            listing = "; ".join(f"{k.name} ({k.description})" for k in served.values())
            raise ValueError(f"{name} v{version} serves no score kind {', '.join(map(repr, unknown))}; it serves: "
                             f"{listing}. See `genserve info {name}`")
        kinds = [served[k] for k in wanted]
        uncalibrated = [k.name for k in kinds if not k.calibrated]
        if args.below_percentile is not None:
            if not 0 < args.below_percentile < 100:
                raise ValueError(f"--below-percentile must be between 0 and 100, got {args.below_percentile:g}")
            if uncalibrated:
                what = ("was exported without calibration" if not manifest.calibration else
                        f"has no calibration for {', '.join(uncalibrated)}")
                raise ValueError(
                    f"--below-percentile needs the model's calibration (the scores of held-out in-distribution "
                    f"data, stored at export), and {name} v{version} {what}. Re-export it with calibration "
                    "(`genserve export CHECKPOINT --repo DIR` scores the validation split; `--calibration FILE` "
                    "for your own rows), or flag relative to this batch with --quantile, or below a fixed log p "
                    "with --threshold")
        if args.threshold is not None or args.quantile is not None:
            if kinds[0].name != LOG_PROB:
                raise ValueError(f"--threshold and --quantile flag by log p; with --score-kind {kinds[0].name} "
                                 "first, flag with --below-percentile P (the kind's calibrated percentile)")
        return cls(name, kinds, percentile=not uncalibrated, below=args.below_percentile,
                   threshold=args.threshold, calibration=_calibration_text(manifest, kinds[0].name))

    def request(self, explain: bool = False) -> dict[str, Any]:
        """Keyword arguments of Client.iter_scores beyond the defaults (none when only log_prob is wanted)."""
        out: dict[str, Any] = {}
        scores = tuple(k.name for k in self.kinds if k.name != LOG_PROB)
        if scores:
            out["scores"] = scores
        if self.percentile:
            out["percentile"] = True
        if explain:
            out["per_dimension"] = True
        return out

    def columns(self, offset: int, part: Any, ids: dict[str, Any]) -> dict[str, Any]:
        """The columns of one answer's rows (a clients.messages.Likelihood starting at row ``offset``)."""
        n = len(part.log_prob)
        log_prob = np.asarray(part.log_prob, dtype=np.float64)
        bpd = (np.full(n, np.nan) if part.bits_per_dim is None
               else np.asarray(part.bits_per_dim, dtype=np.float64))
        out: dict[str, Any] = dict(ids)
        out["row"] = np.arange(offset, offset + n, dtype=np.int64)
        out["log_prob_nats"] = log_prob
        out["bits_per_dim"] = bpd
        for kind in self.kinds:
            if kind.name != LOG_PROB:
                out[kind.name] = self._got(part, "scores", kind.name, n)
        if self.percentile:
            for i, kind in enumerate(self.kinds):
                out["percentile" if i == 0 else f"percentile_{kind.name}"] = self._got(part, "percentiles",
                                                                                     kind.name, n)
        if self.below is not None:
            out["flag"] = out["percentile"] < self.below
            self.flagged += int(out["flag"].sum())
        elif self.threshold is not None:
            out["outlier"] = log_prob < self.threshold
            self.flagged += int(out["outlier"].sum())
        self.rows += n
        self.log_prob_sum += float(log_prob.sum())
        if part.bits_per_dim is not None:
            self.bpd_sum += float(bpd.sum())
            self.bpd_rows += n
        return out

    def _got(self, part: Any, what: str, name: str, n: int) -> np.ndarray:
        values = (getattr(part, what, None) or {}).get(name)
        if values is None or len(values) != n:
            raise ValueError(f"{self.model} answered without {what} of {name!r}; is the server older than the "
                             "client? (score kinds and percentiles need a server of genserve 0.2 or later)")
        return np.asarray(values, dtype=np.float64)

    def badness(self, cols: dict[str, Any]) -> tuple[np.ndarray, ...]:
        """Sort keys (most anomalous first with np.lexsort's last-key-first order): percentile, then the
        primary score turned so that lower is more anomalous."""
        primary = self.kinds[0]
        score = cols["log_prob_nats"] if primary.name == LOG_PROB else cols[primary.name]
        turned = score if primary.higher_is_normal else -score
        return (turned, cols["percentile"]) if self.percentile else (turned,)

    def summary(self) -> str:
        line = f"mean log p {self.log_prob_sum / max(self.rows, 1):.4g} nats"
        if self.bpd_rows:
            line += f", {self.bpd_sum / self.bpd_rows:.4g} bits/dim"
        if self.below is not None:
            line += (f"; {self.flagged} flagged below the {self.below:g}th percentile of {self.kinds[0].name} "
                     f"(calibration: {self.calibration or 'at export'})")
        elif self.threshold is not None:
            line += f"; {self.flagged} outliers below the threshold {self.threshold:g} nats"
        return line


@dataclass
class WorstRows:
    """The ``count`` most anomalous rows seen so far: their examples, per-dimension terms, ids and scores."""

    count: int
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    _keys: tuple[np.ndarray, ...] = ()

    def add(self, x: np.ndarray, per_dimension: np.ndarray, cols: dict[str, Any],
            keys: tuple[np.ndarray, ...]) -> None:
        """Merge one chunk (its examples, per-dimension terms, table columns and badness keys)."""
        label = {name: np.asarray(_text(values), dtype=object) for name, values in cols.items()}
        chunk = {"x": np.asarray(x), "per_dimension": np.asarray(per_dimension, dtype=np.float64), **label}
        if self.rows:
            chunk = {k: np.concatenate([self.rows[k], v]) for k, v in chunk.items()}
            keys = tuple(np.concatenate([a, b]) for a, b in zip(self._keys, keys, strict=True))
        keep = np.lexsort(keys)[: self.count]
        self.rows = {k: v[keep] for k, v in chunk.items()}
        self._keys = tuple(k[keep] for k in keys)


def _text(values: Any) -> list[Any]:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(np.asarray(values))
