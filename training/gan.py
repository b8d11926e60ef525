"""Generative adversarial network (Goodfellow et al., 2014): an implicit model, sampled in one pass, no likelihood.

The generator G maps z ~ N(0, I) to an example; the discriminator D scores real against generated examples. Both
are MLPs: G with BatchNorm (stabilises the generator's early training), D with dropout (keeps it from
memorising the 1000 training digits, which starves G of gradient). Training alternates a D step on
BCE(real -> 1, fake -> 0) and a G step on the non-saturating loss -log D(G(z)).

Model space: digits are scaled to [0, 1] (G ends in a sigmoid, x = (levels - 1) * sigmoid, rounded to levels
when sampled); continuous rows are normalised with the spec's mean/std and G's linear output is denormalised.
There is no likelihood, so early stopping uses a distance between validation data and samples (Frechet
distance of pixels; energy distance of normalised rows; see ``validation_loss``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.base import Capabilities, GenerativeModel


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to rows of ``a`` (N, F) and ``b`` (M, F), in squared units.

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), computed with symmetric eigendecompositions
    in float64 (no scipy.linalg.sqrtm: its complex round-off on near-singular pixel covariances is avoided).
    """
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    mu = a.mean(0) - b.mean(0)
    if a.shape[1] > len(a) + len(b):
        return _frechet_low_rank(a, b, mu)
    sa, sb = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def _frechet_low_rank(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> float:
    """The same distance when there are fewer rows than features (32x32x3 images: F = 3072), without F x F
    matrices. With centred rows A, B and S_a = A^T A / (N - 1), S_b = B^T B / (M - 1), the eigenvalues of
    S_a^1/2 S_b S_a^1/2 are the squared singular values of A B^T / sqrt((N - 1)(M - 1)), an N x M matrix."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = max(len(a) - 1, 1), max(len(b) - 1, 1)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    return float(mu @ mu + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2 * cross)


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance 2 E|A - B| - E|A - A'| - E|B - B'| between the rows of ``a`` and ``b`` (Szekely, 2013).

    Zero only for equal distributions (unlike the Frechet distance, which sees two moments): the criterion for
    low-dimensional rows such as the moons, whose shape is not Gaussian. Units of the rows.
    """
    a = torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(len(a), -1))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(len(b), -1))
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def sample_distance(model: GenerativeModel, x: Tensor, s: Tensor) -> float:
    """Validation criterion of the sample-only families: Frechet distance of raw pixels for discrete data,
    energy distance of normalised rows for continuous data (see ``GAN.validation_loss``)."""
    if model.spec.discrete:
        return frechet_distance(model.flat(x).numpy(), model.flat(s).numpy())
    return energy_distance(model.normalise(x)[0].numpy(), model.normalise(s)[0].numpy())


def mlp(sizes: list[int], act: nn.Module, norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ``act`` between them (optionally BatchNorm before / dropout after each act)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act)
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class GAN(GenerativeModel):
    """A GAN with MLP generator (BatchNorm) and discriminator (dropout), non-saturating loss.

    Arguments:
        latent_dim: size of z; hidden, depth: width and number of hidden layers of G (and of D).
        d_hidden: D's width when it differs from G's (0: same); dropout: D's dropout rate.
        label_smoothing: D's target for real data is 1 - label_smoothing (0: none).
        ema: decay of the moving average of G's weights that samples (0: sample from G itself).
        val_samples: samples drawn for the validation criterion.

    Example:
        >>> from genserve.training.data import load_dataset
        >>> m = GAN(load_dataset("moons").spec, latent_dim=2, hidden=16)
        >>> m.eval().sample(3, Noise(0)).shape
        torch.Size([3, 2])
    """

    name = "gan"
    family = "implicit"
    likelihood_kind = "none"
    operations = ("sample", "decode")
    capabilities = Capabilities("implicit", "unstable", "no", "fast", "no", False)
    profiles = {
        "quick": {"epochs": 120, "batch_size": 64, "lr": 1e-3, "patience": 50,
                  "arch": {"latent_dim": 32, "hidden": 256, "depth": 2, "dropout": 0.3, "val_samples": 500}},
        "full": {"epochs": 800, "batch_size": 64, "lr": 1e-3, "patience": 200, "max_minutes": 9.0,
                 "arch": {"latent_dim": 32, "hidden": 256, "depth": 2, "dropout": 0.3}},
    }
    tabular_profiles = {
        "quick": {"epochs": 200, "batch_size": 128, "lr": 1e-3, "patience": 60,
                  "arch": {"latent_dim": 8, "hidden": 128, "depth": 2, "dropout": 0.1}},
        "full": {"epochs": 1000, "batch_size": 128, "lr": 5e-4, "patience": 200,
                 "arch": {"latent_dim": 8, "hidden": 256, "depth": 3, "dropout": 0.1}},
    }

    def __init__(self, spec: DataSpec, latent_dim: int = 32, hidden: int = 256, depth: int = 2,
                 d_hidden: int = 0, dropout: float = 0.3, label_smoothing: float = 0.0, ema: float = 0.999,
                 val_samples: int = 1000) -> None:
        super().__init__(spec, latent_dim=latent_dim, hidden=hidden, depth=depth, d_hidden=d_hidden,
                         dropout=dropout, label_smoothing=label_smoothing, ema=ema, val_samples=val_samples)
        if latent_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"latent_dim, hidden and depth must be >= 1, got {latent_dim}, {hidden}, {depth}")
        if not 0 <= dropout < 1 or not 0 <= label_smoothing < 0.5 or not 0 <= ema < 1:
            raise ValueError(f"need 0 <= dropout < 1, 0 <= label_smoothing < 0.5 and 0 <= ema < 1, "
                             f"got {dropout}, {label_smoothing}, {ema}")
        D = spec.dim
        self.latent_dim, self.label_smoothing, self.ema = latent_dim, label_smoothing, ema
        self.val_samples = val_samples
        self.G = mlp([latent_dim] + [hidden] * depth + [D], nn.ReLU(), norm=True)
        self.D = mlp([D] + [d_hidden or hidden] * depth + [1], nn.LeakyReLU(0.2), dropout=dropout)
        # An exponential moving average of G's weights is what samples: it averages out the oscillation of
        # adversarial training. No optimizer holds its weights and they get no gradient; ``ema_updates`` counts
        # its updates for the warm-up of the decay (saved, so a resumed run continues the same average).
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False) if ema else None
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # ---- model space ------------------------------------------------------------------------------
    def _to_model(self, x: Tensor) -> Tensor:
        """Raw data (B, *shape) to the space G writes in: [0, 1] for levels, normalised for continuous."""
        if self.spec.discrete:
            return self.flat(x) / (self.spec.levels - 1)
        return self.normalise(x)[0]

    def _g(self, z: Tensor, sampler: bool = False) -> Tensor:
        """G in model space, (B, D); ``sampler`` picks the averaged generator (when ``ema``) used for samples."""
        out = (self.G_ema if sampler and self.G_ema is not None else self.G)(z)
        return torch.sigmoid(out) if self.spec.discrete else out

    def generate(self, z: Tensor) -> Tensor:
        """x = G(z) in raw data units (B, *shape), before rounding to levels; the ``generator`` graph."""
        y = self._g(z, sampler=True)
        if self.spec.discrete:
            return self.unflat(y * (self.spec.levels - 1))
        return self.denormalise(y)

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, mode: str = "d_loss") -> Tensor:
        """The two players' losses (nats, batch means) for a batch of real data ``x``.

        ``d_loss``: BCE of D on real (label 1 - label_smoothing) and generated (label 0) examples; the fake batch
        is detached so only D gets gradient. ``g_loss``: non-saturating -log D(G(z)) (gradient reaches G
        through D). z is drawn from torch's generator: training randomness is seeded by the trainer.
        """
        z = torch.randn(x.shape[0], self.latent_dim, device=x.device)
        if mode == "d_loss":
            fake = self._g(z).detach()
            real_logit, fake_logit = self.D(self._to_model(x)).squeeze(-1), self.D(fake).squeeze(-1)
            t = 1.0 - self.label_smoothing
            real_loss = t * F.softplus(-real_logit) + (1 - t) * F.softplus(real_logit)
            return real_loss.mean() + F.softplus(fake_logit).mean()
        if mode == "g_loss":
            return F.softplus(-self.D(self._g(z)).squeeze(-1)).mean()
        raise ValueError(f"mode must be 'd_loss' or 'g_loss', got {mode!r}")

    def loss(self, x: Tensor) -> Tensor:
        """The discriminator's loss: 2 log 2 = 1.386 nats when D cannot tell real from generated."""
        return self(x, mode="d_loss")

    def make_optimizers(self, lr: float, weight_decay: float) -> list[torch.optim.Optimizer]:
        """[opt_g, opt_d]: Adam with beta1 = 0.5, the usual choice for GANs (less momentum, fewer oscillations)."""
        return [torch.optim.AdamW(p.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)
                for p in (self.G, self.D)]

    def training_step(self, x: Tensor, optimizers: list[torch.optim.Optimizer], grad_clip: float) -> dict[str, float]:
        """One D step then one G step; returns both losses, ``loss`` (= loss_d) for the progress bar."""
        opt_g, opt_d = optimizers
        opt_d.zero_grad(set_to_none=True)
        loss_d = self(x, mode="d_loss")
        loss_d.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.D.parameters(), grad_clip)
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        loss_g = self(x, mode="g_loss")
        loss_g.backward()
        opt_d.zero_grad(set_to_none=True)  # D's gradient from the G step is not used
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.G.parameters(), grad_clip)
        opt_g.step()
        if self.G_ema is not None:
            self._update_ema(torch.randn(x.shape[0], self.latent_dim, device=x.device))
        return {"loss": float(loss_d.detach()), "loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach())}

    @torch.no_grad()
    def _update_ema(self, z: Tensor) -> None:
        # Warm-up (as TensorFlow's ExponentialMovingAverage): decay (1 + t) / (10 + t) until it reaches ``ema``,
        # so the random initial weights do not linger in the average of a short run.
        t = int(self.ema_updates)
        decay = min(self.ema, (1 + t) / (10 + t))
        self.ema_updates += 1
        for avg, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            avg.lerp_(p, 1 - decay)
        # The averaged weights need their own BatchNorm statistics (the live G's do not fit them): one forward
        # pass in training mode updates its running means and variances.
        self.G_ema.train(self.training)
        self.G_ema(z)

    @torch.no_grad()
    def validation_loss(self, x: Tensor) -> float:
        """Sample quality against the validation split, lower is better: there is no likelihood to stop on.

        ``val_samples`` samples (seed 0, so epochs compare) against the validation rows: for images the Frechet
        distance in raw pixel space (squared levels); for continuous rows the energy distance in normalised
        units (it sees the shape of the distribution, not only two moments). Cheap: one generator pass. The
        classifier-feature FID of the evaluation report is computed elsewhere.
        """
        was_training = self.training
        self.eval()
        s = self.sample(self.val_samples, Noise(0))
        self.train(was_training)
        return sample_distance(self, x, s)

    # ---- operations -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """Noise order: z = noise.normal(n, latent_dim) * temperature; x = postprocess(G(z))."""
        z = torch.from_numpy(noise.normal(n, self.latent_dim)) * temperature
        return self.postprocess(self.generate(z))

    @torch.no_grad()
    def decode(self, z: Tensor, noise: Noise | None = None) -> Tensor:
        """G(z) for given latents z (B, latent_dim), in the data domain."""
        return self.postprocess(self.generate(z))

