"""A small digit classifier trained deterministically, whose features give the Frechet distance of samples.

The classifier is the project's own "Inception network" for 8x8 digits: a two-layer CNN (BatchNorm,
dropout) trained on the training split [:1000] with a fixed seed, fixed epochs, one thread, so every machine
gets the same weights. Its penultimate layer (64 values) is the feature space of ``frechet_distance``. The
weights are cached on disk under a name that hashes every setting, so evaluation trains it once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from genserve.core.spec import DataSpec

VERSION = 1  # bump when the architecture or training loop changes, so stale caches are not reused


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines the classifier's weights (hashed into the cache file name)."""

    channels: tuple[int, int] = (32, 64)
    """Output channels of the two 3x3 convolutions."""
    features: int = 64
    """Size of the penultimate layer, the feature space of the Frechet distance."""
    dropout: float = 0.3
    """Dropout before each linear layer."""
    epochs: int = 20
    """Passes over the 1000 training digits (fixed: no early stopping, so training is reproducible)."""
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-3
    seed: int = 0
    shift: bool = True
    """Augment each batch by a random shift of up to one pixel (lifts test accuracy from ~0.95 to ~0.98)."""

    def key(self) -> str:
        """A short hash of the settings and the code version: the cache file's name."""
        blob = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DigitClassifier(nn.Module):
    """CNN for (B, 8, 8) digit images in raw levels 0..16; ``features`` is the penultimate layer (B, 64)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        c1, c2 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Dropout(config.dropout),
            nn.Linear(c2 * 4, config.features), nn.BatchNorm1d(config.features), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.features, 10))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations (B, features) of images (B, 8, 8) in levels 0..16."""
        return self.body(x.reshape(-1, 1, 8, 8) / 16.0)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(x))


def digit_labels() -> np.ndarray:
    """The class labels (0..9) of all 1797 digits, aligned with ``load_dataset('digits')``'s images."""
    return _digit_labels().copy()


@functools.cache
def _digit_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target.astype(np.int64)  # parsing the bundled CSV costs ~0.1 s: do it once


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/genserve, or ~/.cache/genserve."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genserve"


def train_classifier(config: ClassifierConfig = ClassifierConfig()) -> DigitClassifier:
    """Train on the digits training split [:1000], deterministically: same config, same weights, anywhere.

    One thread and deterministic algorithms for the duration (reductions in a fixed order); every random
    draw (initialisation, dropout, shuffling, shifts) comes from the seeded global and a private generator.
    """
    from genserve.training.data import DIGITS_SPLIT, load_dataset

    n_train = DIGITS_SPLIT[0]
    x = torch.as_tensor(load_dataset("digits").train)
    y = torch.as_tensor(digit_labels()[:n_train])
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        model = DigitClassifier(config)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = config.epochs * -(-n_train // config.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(config.epochs):
            perm = torch.randperm(n_train, generator=gen)
            for i in range(0, n_train, config.batch_size):
                idx = perm[i:i + config.batch_size]
                xb = x[idx]
                if config.shift:
                    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
                    xb = nn.functional.pad(xb, (1, 1, 1, 1))[:, dy:dy + 8, dx:dx + 8]
                loss = nn.functional.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng_state)  # leave the caller's random stream as it was
    return model.eval()


def load_classifier(config: ClassifierConfig = ClassifierConfig(), cache_dir: str | Path | None = None,
                    retrain: bool = False) -> DigitClassifier:
    """The trained classifier, from the cache when there (``digits-classifier-<hash>.pt``), else trained and
    cached. A damaged cache file is retrained over."""
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"digits-classifier-{config.key()}.pt"
    if path.exists() and not retrain:
        model = DigitClassifier(config)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # a truncated or foreign file: fall through and train again
            pass
    print(f"training the digit classifier for Frechet distances (once; cached as {path})", file=sys.stderr)
    model = train_classifier(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic, so concurrent evaluations never read half a file
    except OSError:
        pass  # a read-only home: evaluation still works, it just trains each time
    return model


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, x: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images (N, 8, 8) classified as ``labels``."""
    pred = model(torch.as_tensor(np.asarray(x, dtype=np.float32))).argmax(1).numpy()
    return float((pred == labels).mean())


def digits_test_accuracy(model: DigitClassifier) -> float:
    """Accuracy on the digits test split [1350:]."""
    from genserve.training.data import DIGITS_SPLIT, load_dataset

    return classifier_accuracy(model, load_dataset("digits").test, digit_labels()[DIGITS_SPLIT[1]:])


def uses_classifier(spec: DataSpec) -> bool:
    """True for data the digit classifier reads: 8x8 images with 17 levels."""
    return spec.discrete and spec.shape == (8, 8) and spec.levels == 17


@torch.no_grad()
def features(x: np.ndarray, spec: DataSpec, classifier: DigitClassifier | None = None,
             batch_size: int = 1000) -> np.ndarray:
    """Features (N, F) float64 for the Frechet distance of examples ``x`` (N, *spec.shape).

    Digits: the classifier's penultimate layer. Continuous rows: the values normalised with the spec's mean
    and std. Other discrete data: the levels scaled to [0, 1].
    """
    x = np.asarray(x, dtype=np.float32)
    if uses_classifier(spec):
        if classifier is None:
            classifier = load_classifier()
        classifier.eval()
        out = [classifier.features(torch.as_tensor(x[i:i + batch_size])).double().numpy()
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out)
    flat = x.reshape(len(x), -1).astype(np.float64)
    if spec.discrete:
        return flat / (spec.levels - 1)
    if spec.mean:
        return (flat - np.asarray(spec.mean)) / np.asarray(spec.std)
    return flat


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), in squared feature units; 0 for equal sets."""
    from scipy import linalg

    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, F) and (M, F) with one F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 examples per set for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        # A singular product (collapsed samples, fewer examples than features) is expected and handled below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            eps = 1e-6 * np.eye(len(cov_a))  # nudge both covariances, as pytorch-fid does
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; large ones mean a real failure, which we must not hide.
        if not np.allclose(covmean.imag, 0, atol=1e-3 * max(1.0, np.abs(covmean.real).max())):
            raise ValueError(f"matrix square root has imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return float(max(value, 0.0))  # round-off can take equal sets a hair below zero
