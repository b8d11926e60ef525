"""`genserve evaluate`: test-set NLL (nats per example, bits/dim), Frechet distance of samples, and pictures.

Every likelihood is the NLL of the test examples as the data give them: for digits the integer images of the
test split [1350:] (exact for AR, a dequantisation bound for continuous densities, an importance-weighted
bound with K samples for the VAE, the mean energy for energy models, none for GANs). Sample quality is the
Frechet distance between features of the test examples and of ``n_samples`` samples (digit-classifier
features for digits, normalised values for continuous rows). torch is imported lazily (cheap add_parser).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from genserve.training.base import GenerativeModel
    from genserve.training.classifier import DigitClassifier
    from genserve.training.data import Dataset

DEFAULT_IMPORTANCE_SAMPLES = 500
"""K for importance-weighted scoring (VAE): the issue asks for K >= 500 when reporting test NLL."""


def _options(model: GenerativeModel, importance_samples: int) -> dict[str, Any]:
    """Keyword options for ``model.log_prob``: only those the model names (a pPCA takes no K)."""
    params = inspect.signature(model.log_prob).parameters
    if "importance_samples" in params or model.name == "vae":
        return {"importance_samples": importance_samples}
    return {}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (CI logs, --json into a pipe).
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, leave=False,
                disable=None if enabled else True)


def score(model: GenerativeModel, x: np.ndarray, seed: int = 0,
          importance_samples: int = DEFAULT_IMPORTANCE_SAMPLES, batch_size: int = 100,
          progress: bool = True) -> np.ndarray:
    """log p(x) in nats per example (N,), float64, scored in batches from one stream ``Noise(seed)``.

    With K importance samples a batch costs B*K decoder rows, so B shrinks to keep that near 50,000.
    """
    import torch

    from genserve.core.noise import Noise

    options = _options(model, importance_samples)
    if options:
        batch_size = max(1, min(batch_size, 50_000 // max(1, importance_samples)))
    noise, out = Noise(seed), []
    with torch.no_grad(), _progress(len(x), f"scoring {model.name}", progress) as bar:
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.asarray(x[i:i + batch_size], dtype=np.float32))
            out.append(model.log_prob(xb, noise, **options).detach().double().cpu().numpy())
            bar.update(len(xb))
    return np.concatenate(out)


def draw_samples(model: GenerativeModel, n: int, seed: int = 0, batch_size: int = 1000,
                 progress: bool = True) -> np.ndarray:
    """n samples (n, *shape) at temperature 1 from one stream ``Noise(seed)``, in batches; with
    n <= batch_size they equal the server's ``Sample(n, seed)``."""
    import torch

    from genserve.core.noise import Noise

    noise, out = Noise(seed), []
    with torch.no_grad(), _progress(n, f"sampling {model.name}", progress) as bar:
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            out.append(model.sample(m, noise, 1.0).detach().float().cpu().numpy())
            bar.update(m)
    return np.concatenate(out)


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def to_json(result: dict[str, Any]) -> str:
    """One line of strict JSON: non-finite numbers become null (JSON has no NaN or Infinity)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return _finite(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(result), allow_nan=False)


def evaluate(model: GenerativeModel, data: Dataset, *, seed: int = 0, n_samples: int = 1000,
             importance_samples: int = DEFAULT_IMPORTANCE_SAMPLES, out_dir: str | Path | None = None,
             stem: str | None = None, batch_size: int = 100, sample_batch_size: int = 1000,
             classifier: DigitClassifier | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics of ``model`` on ``data.test`` and of ``n_samples`` samples, as a JSON-ready dict.

    Keys: ``nll_nats`` (mean -log p over the test examples, nats per example; null for models without a
    likelihood), ``bits_per_dim`` (nll_nats / (D ln 2)), ``likelihood_kind`` (exact / lower_bound /
    unnormalized / none), ``frechet_distance`` (test features vs sample features), ``n_test``, timings
    (``seconds_scoring``, ``seconds_sampling``) and ``plots`` (paths of the pictures written to ``out_dir``,
    named ``<stem>_samples.png``; none without ``out_dir``).
    """
    from genserve.training.base import bits_per_dim
    from genserve.training.classifier import (
        digits_test_accuracy,
        features,
        frechet_distance,
        load_classifier,
        uses_classifier,
    )

    spec = data.spec
    model.eval()
    warnings: list[str] = []
    kind = getattr(model, "likelihood_kind", "none")
    result: dict[str, Any] = {"model": model.name, "dataset": spec.name, "likelihood_kind": kind,
                              "nll_nats": None, "bits_per_dim": None, "n_test": int(len(data.test)),
                              "importance_samples": None}

    # ---- likelihood ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if kind != "none" and "log_likelihood" in getattr(model, "operations", ()):
        options = _options(model, importance_samples)
        # Warm up (lazy kernels, thread pools) on two examples and a throwaway stream, so the timing below
        # measures scoring rather than the first call's set-up.
        score(model, data.test[:2], (seed + 1) % 2**63, importance_samples, batch_size, progress=False)
        t0 = time.perf_counter()
        logp = score(model, data.test, seed, importance_samples, batch_size, progress)
        nll = float(-logp.mean())
        if not math.isfinite(nll):
            n_bad = int((~np.isfinite(logp)).sum())
            warnings.append(f"{n_bad} test examples have non-finite log-probability")
        result["nll_nats"] = _finite(nll)
        result["bits_per_dim"] = _finite(bits_per_dim(nll, spec.dim))
        result["importance_samples"] = options.get("importance_samples")
    else:
        result["likelihood_kind"] = "none"
    result["seconds_scoring"] = round(time.perf_counter() - t0, 3)

    # ---- samples and their Frechet distance ---------------------------------------------------------
    t0 = time.perf_counter()
    try:
        samples = draw_samples(model, n_samples, seed, sample_batch_size, progress)
    except NotImplementedError as e:  # no family here lacks sampling, but a user's might
        warnings.append(str(e))
        samples = np.zeros((0, *spec.shape), np.float32)
    result["seconds_sampling"] = round(time.perf_counter() - t0, 3)
    result["n_samples"] = int(n_samples)
    if uses_classifier(spec) and classifier is None:
        classifier = load_classifier()
    feature_kind = ("digit_classifier" if uses_classifier(spec)
                    else "scaled_levels" if spec.discrete else "normalised_values")
    result["frechet_features"] = feature_kind
    bad = ~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1) if len(samples) else np.ones(1, bool)
    test_feats = features(data.test, spec, classifier)
    if not len(samples):
        result["frechet_distance"] = None
    elif bad.any():
        warnings.append(f"{int(bad.sum())} of {n_samples} samples are not finite; no Frechet distance")
        result["frechet_distance"] = None
    else:
        result["frechet_distance"] = frechet_distance(test_feats, features(samples, spec, classifier))
    # The same distance between two real splits: the floor a perfect model reaches at these sample sizes.
    result["frechet_distance_validation"] = frechet_distance(test_feats, features(data.val, spec, classifier))
    if classifier is not None:
        result["classifier_test_accuracy"] = digits_test_accuracy(classifier)

    # ---- pictures -----------------------------------------------------------------------------------
    result["plots"] = {}
    if out_dir is not None and not bad.any():
        from genserve.training.plots import plot_samples

        title = f"{model.name} on {spec.name}, seed {seed}"
        if result["nll_nats"] is not None:
            title += f"\nNLL {result['nll_nats']:.2f} nats ({result['likelihood_kind'].replace('_', ' ')})"
        title += "; " if result["nll_nats"] is not None else "\n"
        fd = result["frechet_distance"]
        title += f"Frechet distance {fd:.2f}" if fd is not None else "no Frechet distance"
        target = Path(out_dir) / f"{stem or model.name}_samples.png"
        path = plot_samples(samples, spec, data.test, target, title)
        if path is not None:
            result["plots"]["samples"] = str(path)
    result["seed"] = int(seed)
    result["warnings"] = warnings
    return result


def load_for_evaluation(path: str | Path) -> tuple[GenerativeModel, Dataset]:
    """The model of a checkpoint and the data set it was trained on, rebuilt from its config (``dataset``,
    ``seed``); OSError / ValueError with a one-line message for a bad file."""
    from genserve.core.spec import DataSpec
    from genserve.training.checkpoint import load_checkpoint
    from genserve.training.data import BUILTIN, load_dataset

    path = Path(path)
    try:
        model, ckpt = load_checkpoint(path)
        spec = DataSpec.from_dict(ckpt["spec"])
    except (KeyError, TypeError, RuntimeError) as e:  # a checkpoint of another shape or version
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise ValueError(f"{path} cannot be rebuilt into a model: {why}") from None
    config = ckpt.get("config") or {}
    name = str(config.get("dataset") or spec.name)
    levels = int(config.get("levels") or 0) or (spec.levels if spec.discrete and name not in BUILTIN else 0)
    data = load_dataset(name, seed=int(config.get("seed", 0)), levels=levels)
    if (data.spec.shape, data.spec.kind) != (spec.shape, spec.kind):
        raise ValueError(f"{path} was trained on {spec.kind} data of shape {spec.shape}, but data set "
                         f"{name!r} now holds {data.spec.kind} data of shape {data.spec.shape}")
    return model, data


def evaluate_checkpoint(path: str | Path, *, seed: int = 0, n_samples: int = 1000,
                        importance_samples: int = DEFAULT_IMPORTANCE_SAMPLES,
                        out_dir: str | Path | None = None, progress: bool = True,
                        **kwargs: Any) -> dict[str, Any]:
    """Evaluate a checkpoint on the test split of the data set it was trained on. Pictures go next to the
    checkpoint (``<stem>_samples.png``) unless ``out_dir`` says otherwise."""
    path = Path(path)
    model, data = load_for_evaluation(path)
    result = evaluate(model, data, seed=seed, n_samples=n_samples, importance_samples=importance_samples,
                      out_dir=path.parent if out_dir is None else out_dir, stem=path.stem, progress=progress,
                      **kwargs)
    return {"checkpoint": str(path), **result}


# ---- command line -------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint written by `genserve train`")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--importance-samples", type=int, default=DEFAULT_IMPORTANCE_SAMPLES, metavar="K",
                   help="importance samples per test example for VAE likelihoods "
                   f"(default {DEFAULT_IMPORTANCE_SAMPLES})")
    p.add_argument("--samples", type=int, default=1000, metavar="N",
                   help="samples drawn for the Frechet distance and the picture (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise streams for scoring and sampling")
    p.add_argument("--out-dir", default=None, metavar="D",
                   help="where pictures go (default: next to the checkpoint)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``genserve`` subparsers; the parsed args carry ``handler=run``."""
    p = subparsers.add_parser("evaluate", description=__doc__.splitlines()[0],
                              help="test-set NLL, Frechet distance and sample pictures of a checkpoint")
    _add_arguments(p)
    p.set_defaults(handler=run)
    return p


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_table(r: dict[str, Any]) -> str:
    """The result as an aligned two-column table for people."""
    kind = r["likelihood_kind"].replace("_", " ")
    rows = [("model", r["model"]), ("dataset", f"{r['dataset']} (test split: {r['n_test']} examples)")]
    if r["nll_nats"] is None:
        rows.append(("NLL", "none (this model has no likelihood)"))
    else:
        k = f", K={r['importance_samples']}" if r.get("importance_samples") else ""
        rows += [("NLL", f"{r['nll_nats']:.3f} nats/example ({kind}{k})"),
                 ("bits/dim", f"{r['bits_per_dim']:.4f} ({kind})")]
    rows.append(("Frechet distance",
                 f"{_fmt(r['frechet_distance'])} ({r['n_samples']} samples, {r['frechet_features']})"))
    rows.append(("  validation split", f"{_fmt(r['frechet_distance_validation'])} (real data: the floor)"))
    if "classifier_test_accuracy" in r:
        rows.append(("classifier accuracy", f"{r['classifier_test_accuracy']:.4f} (digits test split)"))
    rows.append(("time", f"scoring {r['seconds_scoring']:.2f} s, sampling {r['seconds_sampling']:.2f} s"))
    for name, p in r["plots"].items():
        rows.append((name, p))
    rows += [("warning", w) for w in r["warnings"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.checkpoint``; one-line errors and exit code 2 for bad input."""
    for flag, v in (("--importance-samples", args.importance_samples), ("--samples", args.samples)):
        if v < 1:
            print(f"genserve: error: {flag} must be at least 1, got {v}", file=sys.stderr)
            return 2
    if args.samples < 2:
        print(f"genserve: error: --samples must be at least 2 for a covariance, got {args.samples}",
                  file=sys.stderr)
        return 2
    if not 0 <= args.seed < 2**63:
        print(f"genserve: error: --seed must be in 0..2**63-1, got {args.seed}", file=sys.stderr)
        return 2
    path = Path(args.checkpoint)
    try:  # only loading is guarded: a failure inside evaluation is a bug and keeps its traceback
        model, data = load_for_evaluation(path)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"genserve: error: {msg}", file=sys.stderr)
        return 2
    result = {"checkpoint": str(path),
              **evaluate(model, data, seed=args.seed, n_samples=args.samples,
                         importance_samples=args.importance_samples,
                         out_dir=path.parent if args.out_dir is None else args.out_dir, stem=path.stem)}
    if args.json:
        print(to_json(result))
    else:
        print(format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``genserve evaluate`` on its own: ``python -m genserve.training.evaluate CHECKPOINT [--json]``."""
    from genserve.core.cli_errors import guarded

    parser = argparse.ArgumentParser(prog="genserve evaluate", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return guarded(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
