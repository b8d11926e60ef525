"""Variational autoencoder: trained on the ELBO, evaluated with the importance-weighted bound on log p(x).

Gaussian posterior q(z|x), standard normal prior, and a categorical (discrete data) or Gaussian (continuous)
decoder. log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al., 2016): K = 1 is the ELBO in
expectation, and the bound tightens as K grows. For discrete data the decoder is a categorical distribution
over the levels of every pixel, so the bound is on the probability of the integer image itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.augment import SHIFTS, random_shifts, shift_images
from genserve.training.autoregressive import AutoregressiveModel
from genserve.training.base import LOG2PI, Capabilities, GenerativeModel, categorical_from_uniform
from genserve.training.logistic_mixture import level_log_probs

LOGVAR_BOUND = 10.0  # log-variances live in (-10, 10): no collapse onto a point, no overflow early in training
IW_ROWS = 16384  # rows per chunk of importance samples, bounding memory at about rows x decoder width
IW_VALUES = 1 << 26  # and at most this many decoder outputs (rows x D x levels) per chunk: 256 MB of float32


def mlp(n_in: int, hidden: int, depth: int, n_out: int, dropout: float) -> nn.Sequential:
    """(B, n_in) -> (B, n_out) through ``depth`` GELU layers of ``hidden`` units, each followed by dropout."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class ChannelsLast(nn.Module):
    """(B, C, H, W) -> (B, H * W * C): each pixel's C outputs together, pixels in row-major order."""

    def forward(self, h: Tensor) -> Tensor:
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)


def conv_encoder(shape: tuple[int, ...], channels: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """(B, H * W) -> (B, n_out): a 3x3 convolution of ``channels`` maps, a stride-2 one of twice as many, then
    one GELU layer of ``hidden`` units (with dropout)."""
    H, W = shape
    c = channels
    return nn.Sequential(nn.Unflatten(1, (1, H, W)), nn.Conv2d(1, c, 3, padding=1), nn.GELU(),
                         nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
                         nn.Linear(2 * c * ((H + 1) // 2) * ((W + 1) // 2), hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, n_out))


def conv_decoder(latent_dim: int, shape: tuple[int, ...], channels: int, hidden: int, n_out: int,
                 dropout: float) -> nn.Sequential:
    """(B, latent_dim) -> (B, H * W * n_out): a GELU layer of ``hidden`` units (with dropout), a map of 2 x
    ``channels`` at half the resolution, a stride-2 transposed convolution to ``channels`` maps at full
    resolution, a 3x3 convolution, and ``n_out`` outputs per pixel (a 1x1 convolution)."""
    H, W = shape
    c = channels
    return nn.Sequential(nn.Linear(latent_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 2 * c * (H // 2) * (W // 2)), nn.GELU(),
                         nn.Unflatten(1, (2 * c, H // 2, W // 2)),
                         nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.GELU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, n_out, 1), ChannelsLast())


class VAE(GenerativeModel):
    """A VAE with MLP encoder and decoder (``depth`` hidden layers of ``hidden`` units) and a ``latent_dim``-
    dimensional latent. ``dropout`` regularises the decoder, ``encoder_dropout`` the encoder. ``logit_rank`` r > 0
    makes the categorical decoder's logits a per-pixel bias plus r features per pixel times a basis over the
    levels shared by all pixels (fewer weights than a free D x levels output layer: less overfitting).

    Training maximises the ELBO (one reparameterised sample, analytic KL), or with ``train_samples`` = K > 1
    the importance-weighted bound; the KL (prior) terms are scaled by beta, rising linearly from 0 to 1 over
    ``kl_warmup_steps`` optimisation steps (KL warm-up). ``importance_samples`` is the default K of ``log_prob``.
    ``shift_aug`` p > 0 (discrete images): training moves each image by one pixel with probability p and gives
    encoder and decoder the shift (a learned vector per shift added to their first layer, a logit bias per
    shift), ``training.augment``; every operation and exported graph uses the identity's.

    Further options, each off by default (and then absent from ``arch``): ``conv`` c > 0 (one-channel images of
    even size) makes encoder and decoder convolutional (c and 2c feature maps, one hidden layer of ``hidden``
    units; ``conv_encoder``, ``conv_decoder``); ``logistic`` K > 0 puts a mixture of K discretised logistics on
    the levels instead of free logits (``training.logistic_mixture``); ``prior_components`` C > 0 replaces
    N(0, I) by a VampPrior over C learned pseudo-inputs (Tomczak & Welling, 2018), used by the bound, by
    ``sample`` and, through the contract's ``log_prior`` and ``prior``, by the served model; ``prior_gaussians``
    C > 0 replaces it by an equally weighted mixture of C learned diagonal Gaussians instead (2 x C x latent_dim
    parameters, used the same way); ``dreg`` trains the encoder with the doubly reparameterised gradient of the
    importance-weighted bound (Tucker et al., 2019: same bound, lower variance; ``train_samples`` > 1); ``ema`` and
    ``lr_half_life`` are the moving average of the weights (eval mode answers with it) and the halving learning
    rate of the autoregressive models.

    Example:
        >>> from genserve.training.data import load_dataset
        >>> data = load_dataset("moons", seed=0)
        >>> m = VAE(data.spec, latent_dim=2, hidden=32)
        >>> m.sample(3, Noise(0)).shape
        torch.Size([3, 2])
    """

    name = "vae"
    family = "latent_variable"
    likelihood_kind = "lower_bound"
    operations = ("sample", "log_likelihood", "encode", "decode")
    capabilities = Capabilities("prescribed", "stable", "approximate", "fast", "lossy", True)
    profiles = {
        "quick": {"epochs": 40, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-3, "grad_clip": 10.0, "patience": 15,
                  "arch": {"latent_dim": 16, "hidden": 256, "depth": 2, "dropout": 0.2, "logit_rank": 3,
                           "kl_warmup_steps": 300}},
        # full: trained on the importance-weighted bound (docs/results/quality.md), convolutional encoder and
        # decoder (16 and 32 maps; conv), moving average of the weights. 2026-12-03: K = 16 samples per step with
        # the doubly reparameterised encoder gradient (dreg), batches of 32 (lr halving every 4000 steps, the same
        # per epoch as before): validation (K = 64) 87.99 -> 87.30 (best epoch 104). Before it (K = 8, batch 64):
        # 341 s CPU, test 83.57 at K = 5000. Probes on validation (K = 64): conv 32 88.26 (overfits by epoch 90);
        # conv 32 + lr half-life 1000 + a 3-Gaussian prior 88.63; encoder dropout 0.2 88.11; batch 32 87.95;
        # batch 32 + dreg (K = 8) 87.75. Earlier: VampPrior overfits, K = 16 without dreg behind
        "full": {"epochs": 300, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-3, "grad_clip": 10.0,
                 "patience": 30,
                 "arch": {"latent_dim": 32, "hidden": 512, "depth": 2, "dropout": 0.5, "logit_rank": 3,
                          "kl_warmup_steps": 800, "train_samples": 16, "conv": 16, "ema": 0.999,
                          "lr_half_life": 4000, "dreg": True}},
    }
    tabular_profiles = {
        "quick": {"epochs": 60, "batch_size": 128, "lr": 2e-3, "grad_clip": 10.0, "patience": 15,
                  "arch": {"latent_dim": 2, "hidden": 64, "depth": 2, "dropout": 0.0, "kl_warmup_steps": 300}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 1e-3, "grad_clip": 10.0, "patience": 30,
                 "arch": {"latent_dim": 2, "hidden": 128, "depth": 2, "dropout": 0.0, "kl_warmup_steps": 1000}},
    }
    validation_samples = 64  # K of the importance-weighted bound used for early stopping

    def __init__(self, spec: DataSpec, latent_dim: int = 16, hidden: int = 256, depth: int = 2, dropout: float = 0.0,
                 encoder_dropout: float = 0.0, logit_rank: int = 0, kl_warmup_steps: int = 0, train_samples: int = 1,
                 importance_samples: int = 500, shift_aug: float = 0.0, logistic: int = 0, ema: float = 0.0,
                 lr_half_life: int = 0, prior_components: int = 0, conv: int = 0, prior_gaussians: int = 0,
                 dreg: bool = False) -> None:
        # options off: the arch dict (stored in checkpoints) as before they existed
        extra = {k: v for k, v in (("logistic", logistic), ("ema", ema), ("lr_half_life", lr_half_life),
                                   ("prior_components", prior_components), ("conv", conv),
                                   ("prior_gaussians", prior_gaussians), ("dreg", bool(dreg))) if v}
        super().__init__(spec, latent_dim=latent_dim, hidden=hidden, depth=depth, dropout=dropout,
                         encoder_dropout=encoder_dropout, logit_rank=logit_rank, kl_warmup_steps=kl_warmup_steps,
                         train_samples=train_samples, importance_samples=importance_samples, shift_aug=shift_aug,
                         **extra)
        if logistic < 0 or (logistic and (not spec.discrete or logit_rank)):
            raise ValueError(f"logistic is a number of mixture components >= 0 for discrete data without "
                             f"logit_rank, got {logistic} (logit_rank {logit_rank}, discrete {spec.discrete})")
        if not 0.0 <= ema < 1.0 or lr_half_life < 0:
            raise ValueError(f"ema is a decay per step in [0, 1) and lr_half_life >= 0, got {ema}, {lr_half_life}")
        if prior_components < 0 or prior_gaussians < 0 or (prior_components and prior_gaussians):
            raise ValueError(f"prior_components (pseudo-inputs) and prior_gaussians (mixture components) are >= 0, "
                             f"at most one of them > 0, got {prior_components}, {prior_gaussians}")
        self.logistic, self.ema, self.lr_half_life = logistic, float(ema), int(lr_half_life)
        self.prior_components, self.prior_gaussians = int(prior_components), int(prior_gaussians)
        self.dreg = bool(dreg)
        self._ema_names: dict[str, str] = {}
        if latent_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"latent_dim, hidden and depth must be >= 1, got {latent_dim}, {hidden}, {depth}")
        if importance_samples < 1 or train_samples < 1:
            raise ValueError(f"importance_samples and train_samples must be >= 1, got {importance_samples}, "
                             f"{train_samples}")
        self.latent_dim, self.kl_warmup_steps, self.importance_samples = latent_dim, kl_warmup_steps, importance_samples
        self.train_samples = train_samples
        D = spec.dim
        self.logit_rank = logit_rank if spec.discrete else 0
        self.out_per_dim = (self.logit_rank or 3 * logistic or spec.levels) if spec.discrete else 2
        self.conv = conv
        if conv:  # convolutional encoder and decoder (one hidden layer each beside the convolutions)
            if conv < 0 or not (spec.is_image and len(spec.shape) == 2 and spec.shape[0] % 2 == spec.shape[1] % 2 == 0):
                raise ValueError(f"conv is a number of feature maps >= 0 for one-channel images of even height and "
                                 f"width, got {conv} for data of shape {spec.shape}")
            if shift_aug:
                raise ValueError("shift_aug conditions the MLP encoder's first layer: not with conv")
            self.enc = conv_encoder(spec.shape, conv, hidden, 2 * latent_dim, encoder_dropout)
            self.dec = conv_decoder(latent_dim, spec.shape, conv, hidden, self.out_per_dim, dropout)
        else:
            self.enc = mlp(D, hidden, depth, 2 * latent_dim, encoder_dropout)
            self.dec = mlp(latent_dim, hidden, depth, D * self.out_per_dim, dropout)
        if self.logit_rank:  # logits = per-pixel bias + (B, D, r) features times a basis shared by all pixels
            self.logit_basis = nn.Parameter(torch.randn(self.logit_rank, spec.levels) / math.sqrt(self.logit_rank))
            self.logit_bias = nn.Parameter(torch.zeros(D, spec.levels))
        self.shift_aug = float(shift_aug)
        if not 0.0 <= self.shift_aug <= 1.0:
            raise ValueError(f"shift_aug is a probability in [0, 1], got {shift_aug}")
        if self.shift_aug:
            if not (spec.is_image and spec.discrete):
                raise ValueError(f"shift_aug shifts discrete images, not data of shape {spec.shape}")
            # the shift as conditioning input: zero at first, so every shift starts as the identity
            self.enc_shift = nn.Parameter(torch.zeros(len(SHIFTS), hidden))
            self.dec_shift = nn.Parameter(torch.zeros(len(SHIFTS), hidden))
            self.shift_logit_bias = nn.Parameter(torch.zeros(len(SHIFTS), D, spec.levels))
        if self.prior_components:  # VampPrior pseudo-inputs, in the encoder's input units (pre-sigmoid if discrete)
            g = torch.Generator().manual_seed(0)
            self.pseudo_inputs = nn.Parameter(0.5 * torch.randn(self.prior_components, D, generator=g)
                                              - (1.0 if spec.discrete else 0.0))
        if self.prior_gaussians:  # mixture of Gaussians: spread-out means (distinct components), unit variances
            g = torch.Generator().manual_seed(0)
            self.prior_mu = nn.Parameter(0.5 * torch.randn(self.prior_gaussians, latent_dim, generator=g))
            self.prior_raw_logvar = nn.Parameter(torch.zeros(self.prior_gaussians, latent_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimisation steps, for the warm-up
        self._setup_averaging()

    # the moving average of the weights and the halving learning rate: the autoregressive models' own code
    make_optimizers = AutoregressiveModel.make_optimizers
    _setup_averaging = AutoregressiveModel._setup_averaging
    _update_average = AutoregressiveModel._update_average
    _swap_average = AutoregressiveModel._swap_average

    def train(self, mode: bool = True) -> VAE:
        """Eval mode answers with the moving average of the weights (``ema`` > 0), training mode with the raw ones."""
        super().train(mode)
        if self._ema_names and int(self.ema_steps) > 0 and bool(self.ema_active) == mode:
            self._swap_average()
        return self

    # ---- deterministic graphs -------------------------------------------------------------------
    def _run(self, net: nn.Sequential, h: Tensor, shifts: Tensor | None, shift: Tensor | None) -> Tensor:
        """net(h), with the shift's learned vector added after the first layer (``shift_aug``; None: identity)."""
        if shifts is None:
            return net(h)
        h = net[0](h) + shifts[0 if shift is None else shift]
        for layer in net[1:]:
            h = layer(h)
        return h

    def encoder(self, x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior q(z|x) = N(mu, exp(logvar)), each (B, latent_dim); ``shift`` (B,) indexes ``SHIFTS`` in
        training with ``shift_aug`` (None: the identity)."""
        h = self.flat(x) / (self.spec.levels - 1) if self.spec.discrete else self.normalise(x)[0]
        return self._encode(h, shift)

    def _encode(self, h: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|.) from the encoder's input h (B, D): levels scaled to [0, 1] or normalised values."""
        mu, raw = self._run(self.enc, h, getattr(self, "enc_shift", None), shift).chunk(2, dim=-1)
        return mu, LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)

    # ---- the prior: N(0, I), or a learned mixture of C equally weighted diagonal Gaussians --------------
    @property
    def n_prior(self) -> int:
        """C, the learned prior's number of components (0: N(0, I))."""
        return self.prior_components or self.prior_gaussians

    def prior_components_params(self) -> tuple[Tensor, Tensor]:
        """The learned prior's components' (mu, logvar), each (C, latent_dim), p(z) = (1/C) sum_c N(z; mu_c,
        exp(logvar_c)): ``prior_gaussians``, free parameters; ``prior_components``, the VampPrior (Tomczak &
        Welling, 2018), q(z | u_c) over C learned pseudo-inputs u_c."""
        if self.prior_gaussians:
            return self.prior_mu, LOGVAR_BOUND * torch.tanh(self.prior_raw_logvar / LOGVAR_BOUND)
        u = self.pseudo_inputs
        return self._encode(torch.sigmoid(u) if self.spec.discrete else u)

    def _log_prior(self, z: Tensor) -> Tensor:
        """log p(z), (B,) nats."""
        if not self.n_prior:
            return -0.5 * (z.pow(2) + LOG2PI).sum(-1)
        mu, logvar = self.prior_components_params()
        prec = torch.exp(-logvar)  # (C, q)
        # sum_j (z_j - mu_cj)^2 / var_cj as three matrix products: (B, C) without a (B, C, q) intermediate
        sq = z.pow(2) @ prec.T - 2.0 * z @ (mu * prec).T + (mu.pow(2) * prec).sum(-1)
        log_n = -0.5 * (sq + logvar.sum(-1) + self.latent_dim * LOG2PI)
        return torch.logsumexp(log_n, dim=-1) - math.log(self.n_prior)

    def _prior_draw(self, eps: Tensor, u: Tensor) -> Tensor:
        """z (B, latent_dim) from the learned prior: component c = floor(u * C) of u (B, 1) uniform in [0, 1), then
        mu_c + exp(logvar_c / 2) * eps with eps (B, latent_dim) standard normal (times the temperature)."""
        mu, logvar = self.prior_components_params()
        c = torch.clamp(torch.floor(u[:, 0] * self.n_prior), 0, self.n_prior - 1).long()
        return mu[c] + torch.exp(0.5 * logvar[c]) * eps

    @property
    def prior(self) -> Any:
        """The family contract's optional ``prior(eps, u) -> z`` (the served Sample draws z through it), present
        only with a learned prior; None for N(0, I), whose z is eps itself."""
        return self._prior_draw if self.n_prior else None

    @property
    def log_prior(self) -> Any:
        """The contract's optional ``log_prior(z)``, which ``log_weights`` uses; None for N(0, I)."""
        return self._log_prior if self.n_prior else None

    def decoder(self, z: Tensor, shift: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Discrete: logits (B, D, levels). Continuous: (mean, std) of p(x|z), each (B, D), raw units (std rather
        than a log-variance so that sampling, mean + std * eps, is the same float32 arithmetic everywhere).
        ``shift`` as in ``encoder``."""
        out = self._run(self.dec, z, getattr(self, "dec_shift", None), shift)
        if self.spec.discrete:
            if self.logit_rank:
                logits = out.reshape(z.shape[0], self.dim, self.logit_rank) @ self.logit_basis + self.logit_bias
            elif self.logistic:  # log-probabilities of the levels, which are logits of the same distribution
                logits = level_log_probs(out.reshape(z.shape[0], self.dim, 3 * self.logistic), self.spec.levels)
            else:
                logits = out.reshape(z.shape[0], self.dim, self.spec.levels)
            if self.shift_aug:
                logits = logits + self.shift_logit_bias[0 if shift is None else shift]
            return logits
        mean, raw = out.reshape(z.shape[0], self.dim, 2).unbind(-1)
        logvar = LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)
        std = torch.tensor(self.spec.std, dtype=z.dtype)
        return mean * std + torch.tensor(self.spec.mean, dtype=z.dtype), torch.exp(0.5 * logvar) * std

    def log_likelihood_given_z(self, x: Tensor, z: Tensor, shift: Tensor | None = None) -> Tensor:
        """log p(x|z) in nats (raw units for continuous data), shape (B,)."""
        if self.spec.discrete:
            logp = torch.log_softmax(self.decoder(z, shift), dim=-1)
            return logp.gather(-1, self.flat(x).long().unsqueeze(-1)).squeeze(-1).sum(-1)
        mean, std = self.decoder(z)
        return -(0.5 * LOG2PI + torch.log(std) + 0.5 * ((self.flat(x) - mean) / std).pow(2)).sum(-1)

    def log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """log p(x, z) - log q(z|x) for z = mu + sigma * eps, shape (B,): one importance weight per row."""
        rec, prior_ratio = self._weight_terms(x, *self.encoder(x), eps)
        return rec + prior_ratio

    def _weight_terms(self, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor,
                      shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(log p(x|z), log p(z) - log q(z|x)) for z = mu + sigma * eps, each (B,)."""
        z = mu + torch.exp(0.5 * logvar) * eps
        log_prior = self._log_prior(z)
        log_q = -0.5 * (eps.pow(2) + LOG2PI + logvar).sum(-1)
        return self.log_likelihood_given_z(x, z, shift), log_prior - log_q

    # ---- training -------------------------------------------------------------------------------
    def elbo_terms(self, x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One-sample reconstruction term E_q log p(x|z) and analytic KL(q || p), each (B,), nats."""
        mu, logvar = self.encoder(x, shift)
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        if self.n_prior:  # no closed form: the one-sample estimate log q(z|x) - log p(z)
            kl = -0.5 * (eps.pow(2) + LOG2PI + logvar).sum(-1) - self._log_prior(z)
        else:
            kl = 0.5 * (mu.pow(2) + torch.exp(logvar) - 1 - logvar).sum(-1)
        return self.log_likelihood_given_z(x, z, shift), kl

    def loss(self, x: Tensor) -> Tensor:
        """Negative ELBO (``train_samples`` = 1) or negative importance-weighted bound with K = ``train_samples``
        (Burda et al.), nats per example; the KL / prior terms are scaled by beta during the warm-up."""
        if self.training:
            beta = min(1.0, float(self.steps + 1) / self.kl_warmup_steps) if self.kl_warmup_steps else 1.0
            self.steps += 1
        else:
            beta = 1.0
        shift = None
        if self.training and self.shift_aug:
            shift = random_shifts(x.shape[0], self.shift_aug)
            x = shift_images(x, shift)
        if self.train_samples == 1:
            rec, kl = self.elbo_terms(x, shift)
            return -(rec - beta * kl).mean()
        K, B = self.train_samples, x.shape[0]
        mu, logvar = self.encoder(x, shift)  # once per example: the K samples share one posterior
        rep = (K, *(1,) * (x.dim() - 1))
        eps = torch.randn(K * B, self.latent_dim, dtype=x.dtype, device=x.device)
        shift_k = None if shift is None else shift.repeat(K)
        if not (self.dreg and self.training and torch.is_grad_enabled()):
            rec, prior_ratio = self._weight_terms(x.repeat(rep), mu.repeat(K, 1), logvar.repeat(K, 1), eps, shift_k)
            logw = (rec + beta * prior_ratio).reshape(K, B)
            return -(torch.logsumexp(logw, dim=0) - math.log(K)).mean()
        # DReG (Tucker et al., 2019): the same bound, but the encoder learns only through z, from log q(z|x) with
        # its parameters held fixed, each sample's gradient weighted by w_k^2 rather than w_k (normalised weights):
        # an unbiased gradient of lower variance. The hook multiplies dlogsumexp/dz_k (= w_k dlogw_k/dz_k) by w_k.
        mu_k, logvar_k = mu.repeat(K, 1), logvar.repeat(K, 1)
        z = mu_k + torch.exp(0.5 * logvar_k) * eps
        m, lv = mu_k.detach(), logvar_k.detach()
        log_q = -0.5 * ((z - m).pow(2) * torch.exp(-lv) + LOG2PI + lv).sum(-1)
        rec = self.log_likelihood_given_z(x.repeat(rep), z, shift_k)
        logw = (rec + beta * (self._log_prior(z) - log_q)).reshape(K, B)
        w = torch.softmax(logw.detach(), dim=0).reshape(K * B, 1)
        z.register_hook(lambda g: g * w)
        return -(torch.logsumexp(logw, dim=0) - math.log(K)).mean()

    def forward(self, x: Tensor) -> Tensor:
        return self.loss(x)

    @torch.no_grad()
    def validation_loss(self, x: Tensor) -> float:
        """Importance-weighted NLL with ``validation_samples`` samples, nats per example."""
        return float(-self.log_prob(x, Noise(0), importance_samples=self.validation_samples).mean())

    # ---- operations -------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, noise: Noise, importance_samples: int | None = None, **options: Any) -> Tensor:
        """Importance-weighted bound log (1/K) sum_k w_k with K = ``importance_samples``, nats, (B,).

        Noise order: eps = noise.normal(K, B, latent_dim), drawn in chunks of consecutive k (the same
        numbers as one draw); row k*B + b of a chunk scores example b with its k-th sample.
        """
        K = int(importance_samples or self.importance_samples)
        B = x.shape[0]
        chunk = max(1, self.iw_rows // B)
        logw = []
        for k0 in range(0, K, chunk):
            k = min(chunk, K - k0)
            eps = torch.from_numpy(noise.normal(k, B, self.latent_dim)).reshape(k * B, self.latent_dim)
            xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * B, *x.shape[1:])
            logw.append(self.log_weights(xs, eps).reshape(k, B).double())
        return (torch.logsumexp(torch.cat(logw), dim=0) - math.log(K)).float()

    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """Noise order: z = noise.normal(n, q) * temperature (with a learned prior: eps, then its component's
        uniform noise.uniform(n, 1), z = prior(eps, u)); then discrete: u = noise.uniform(n, D) and an
        inverse-CDF categorical draw per pixel; continuous: x = mean + std * noise.normal(n, D) * temperature."""
        z = torch.from_numpy(noise.normal(n, self.latent_dim)) * temperature
        if self.n_prior:
            z = self._prior_draw(z, torch.from_numpy(noise.uniform(n, 1)))
        if self.spec.discrete:
            u = torch.from_numpy(noise.uniform(n, self.dim))
            return self.unflat(categorical_from_uniform(self.decoder(z), u))
        mean, std = self.decoder(z)
        eps = torch.from_numpy(noise.normal(n, self.dim)) * temperature
        return self.unflat(mean + std * eps)

    def encode(self, x: Tensor, noise: Noise | None = None) -> Tensor:
        """The posterior mean mu(x), (B, latent_dim)."""
        return self.encoder(x)[0]

    def decode(self, z: Tensor, noise: Noise | None = None) -> Tensor:
        """The decoder's most likely level per pixel (discrete) or its mean (continuous)."""
        if self.spec.discrete:
            return self.unflat(self.decoder(z).argmax(-1).to(z.dtype))
        return self.unflat(self.decoder(z)[0])

    @property
    def iw_rows(self) -> int:
        """Rows per chunk of importance samples: ``IW_ROWS``, fewer when one row's decoder output is wide (32x32x3
        images of 256 levels: 786432 logits per row), so that a chunk holds at most ``IW_VALUES`` outputs."""
        width = self.dim * (self.spec.levels if self.spec.discrete else 2)
        return min(IW_ROWS, max(1, IW_VALUES // width))

    def program_parameters(self) -> dict[str, float]:
        return {"importance_samples": self.importance_samples,
                "iw_rows": self.iw_rows}
