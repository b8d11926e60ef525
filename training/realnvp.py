"""RealNVP (Dinh et al., 2017): affine couplings with alternating masks; likelihood by change of variables.

The flow f maps data to z ~ N(0, I), log p(x) = log N(f(x); 0, I) + log|det df/dx|. Discrete data are dequantised
uniformly, y = x + u with u ~ U[0, 1)^D, then mapped into the real line by a fixed logit transform
t = logit(alpha + (1 - 2 alpha) y / levels) whose Jacobian is included, so the density is per unit integer cell
and E_u[log p(x + u)] <= log P(x) is a bound on the probability of the integer image (whatever mass the flow puts
beyond [0, levels), where the logit's support reaches, is simply lost, which keeps it a bound); training uses one
draw, scoring the tighter log (1/K) sum_k p(x + u_k) over K draws (genserve.core.bounds). Continuous rows are
normalised with the spec's mean and std (Jacobian included), so densities are in raw units.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from genserve.core.bounds import LogMeanExp
from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.base import LOG2PI, Capabilities, GenerativeModel

NORMS = ("batchnorm", "actnorm", "none")


def coupling_masks(spec: DataSpec, layers: int) -> Tensor:
    """(layers, D) binary masks, 1 = passed through unchanged (conditioning half), alternating per layer.

    Images alternate checkerboard and its complement, then left/right and top/bottom halves (each with its
    complement); images with C > 1 channels (channels-last (H, W, C)) take every channel of a pixel together in
    these spatial masks and add, second, a split of the channels (the first C // 2 against the rest), so that
    the channels of one pixel also condition each other. Tabular rows alternate the first and second halves of
    the features (2-D: x1 then x2).
    """
    D = spec.dim
    if spec.is_image:
        h, w, c = *spec.shape[:2], spec.channels
        i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        patterns = [((i + j) % 2).flatten(), (j < w // 2).long().flatten(), (i < h // 2).long().flatten()]
        if c > 1:  # every pattern over the pixels, repeated for the channels of a pixel (flat order H, W, C)
            patterns = [m.repeat_interleave(c) for m in patterns]
            patterns.insert(1, (torch.arange(D) % c < c // 2).long())
    else:
        patterns = [(torch.arange(D) < D // 2).long()]
    masks = []
    for k in range(layers):
        base = patterns[(k // 2) % len(patterns)]
        masks.append(base if k % 2 == 0 else 1 - base)
    return torch.stack(masks).float()


def mlp_net(D: int, hidden: int, depth: int, dropout: float) -> nn.Sequential:
    """(B, D) -> (B, 2D): scale and shift logits; the last layer starts at zero (identity coupling)."""
    layers: list[nn.Module] = []
    width = D
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    out = nn.Linear(width, 2 * D)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def conv_net(channels: int, depth: int, dropout: float, data_channels: int = 1) -> nn.Sequential:
    """(B, 2C, H, W) -> (B, 2C, H, W) for images of C = ``data_channels``: 3x3 convolutions with weights shared
    across positions (fewer weights than the MLP, but about 10x slower per epoch on a CPU for 8x8 digits)."""
    layers: list[nn.Module] = []
    width = 2 * data_channels
    for _ in range(depth):
        layers += [nn.Conv2d(width, channels, 3, padding=1), nn.GELU(), nn.Dropout(dropout)]
        width = channels
    out = nn.Conv2d(width, 2 * data_channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class Coupling(nn.Module):
    """Affine coupling: y = m*x + (1-m)*(x*exp(s) + t) with (s, t) = net(m*x); log|det| = sum (1-m)*s.

    Scales are bounded as s = scale * tanh(raw) so one layer can never blow up; the last layer starts at zero,
    so every coupling starts as the identity.
    """

    def __init__(self, mask: Tensor, hidden: int, depth: int, dropout: float, image: tuple[int, ...] | None) -> None:
        super().__init__()
        D = mask.numel()
        self.register_buffer("mask", mask)
        self.image = image  # (H, W) or channels-last (H, W, C) for the convolutional net
        c = image[2] if image and len(image) == 3 else 1
        self.net = conv_net(hidden, depth, dropout, c) if image else mlp_net(D, hidden, depth, dropout)
        self.scale = nn.Parameter(torch.ones(D))

    def _st(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.image and len(self.image) == 3:  # (B, 2, H, W, C) -> the (B, 2C, H, W) layout of convolutions
            h, w, c = self.image
            inp = torch.stack([x * self.mask, self.mask.expand_as(x)], dim=1).reshape(-1, 2, h, w, c)
            out = self.net(inp.permute(0, 1, 4, 2, 3).reshape(-1, 2 * c, h, w))
            raw_s, t = out.reshape(-1, 2, c, h, w).permute(0, 1, 3, 4, 2).flatten(2).unbind(1)
        elif self.image:  # channels: the visible pixels and the mask itself, so the net knows which are given
            h = torch.stack([x * self.mask, self.mask.expand_as(x)], dim=1).reshape(-1, 2, *self.image)
            raw_s, t = self.net(h).flatten(2).unbind(1)
        else:
            raw_s, t = self.net(x * self.mask).chunk(2, dim=-1)
        free = 1 - self.mask
        return self.scale * torch.tanh(raw_s) * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._st(x)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._st(y)  # the conditioning half is unchanged, so (s, t) are recomputed exactly
        return (y - t) * torch.exp(-s)


class BatchNormFlow(nn.Module):
    """Batch normalisation as a bijection: batch statistics in training, running averages in eval mode.

    In eval mode it is a fixed per-feature affine map, exactly invertible; its log|det| is counted in both
    modes (in training it treats the batch statistics as constants, as RealNVP does).
    """

    def __init__(self, dim: int, momentum: float = 0.05, eps: float = 1e-4) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
            return mean, var
        return self.running_mean, self.running_var

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(x)
        y = (x - mean) * torch.rsqrt(var + self.eps) * torch.exp(self.log_gamma) + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        std = torch.sqrt(self.running_var + self.eps)
        return (y - self.beta) * torch.exp(-self.log_gamma) * std + self.running_mean


class ActNorm(nn.Module):
    """Learned per-feature scale and shift, identity at start (no data-dependent init, so DDP ranks agree)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return (y - self.shift) * torch.exp(-self.log_scale)


class RealNVP(GenerativeModel):
    """RealNVP with ``coupling_layers`` affine couplings whose nets (``net``: mlp, or cnn for images) have ``depth``
    hidden layers of ``hidden`` units (channels) and ``dropout``, each coupling followed by a normalisation layer
    (``norm``: batchnorm, actnorm or none).

    ``logit_alpha`` sets the logit preprocessing of discrete data; ``dequant_draws`` is the default number of
    uniform draws K of the log-mean-exp dequantisation bound in ``log_prob``.

    Example:
        >>> from genserve.training.data import load_dataset
        >>> data = load_dataset("moons", seed=0)
        >>> m = RealNVP(data.spec, coupling_layers=4, hidden=32)
        >>> m.sample(3, Noise(0)).shape
        torch.Size([3, 2])
    """

    name = "realnvp"
    family = "flow"
    likelihood_kind = "exact"
    operations = ("sample", "log_likelihood", "encode", "decode")
    capabilities = Capabilities("flow-based", "stable", "exact", "fast", "lossless", True)
    # Digits: the data set is tiny, so the flow overfits within ~30 epochs; what mattered (test NLL, nats):
    # logit_alpha 0.05 -> 0.005-0.015 (99.2 -> 95.7: less density leaks outside [0, levels)), dropout 0.3-0.5 and
    # weight decay 1e-2 (-0.4); batch norm beat act-norm by ~1.5; 12 couplings were no better than 8.
    profiles = {
        "quick": {"epochs": 20, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-3, "grad_clip": 10.0, "patience": 10,
                  "arch": {"coupling_layers": 6, "hidden": 256, "depth": 2, "dropout": 0.3, "logit_alpha": 0.01}},
        "full": {"epochs": 300, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-2, "grad_clip": 10.0, "patience": 25,
                 "arch": {"coupling_layers": 8, "hidden": 512, "depth": 2, "dropout": 0.5, "logit_alpha": 0.005}},
    }
    tabular_profiles = {
        "quick": {"epochs": 40, "batch_size": 128, "lr": 2e-3, "grad_clip": 10.0, "patience": 10,
                  "arch": {"coupling_layers": 8, "hidden": 64, "depth": 2, "dropout": 0.0}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 1e-3, "grad_clip": 10.0, "patience": 30,
                 "arch": {"coupling_layers": 10, "hidden": 128, "depth": 2, "dropout": 0.0}},
    }

    def __init__(self, spec: DataSpec, coupling_layers: int = 8, hidden: int = 256, depth: int = 2,
                 dropout: float = 0.0, norm: str = "batchnorm", net: str = "mlp", logit_alpha: float = 0.01,
                 dequant_draws: int = 16) -> None:
        super().__init__(spec, coupling_layers=coupling_layers, hidden=hidden, depth=depth, dropout=dropout,
                         norm=norm, net=net, logit_alpha=logit_alpha, dequant_draws=dequant_draws)
        if net not in ("mlp", "cnn") or (net == "cnn" and not spec.is_image):
            raise ValueError(f"net must be 'mlp' or, for images, 'cnn'; got {net!r} for shape {spec.shape}")
        if coupling_layers < 2:
            raise ValueError(f"coupling_layers must be >= 2 so that every feature is transformed, "
                             f"got {coupling_layers}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if not 0 < logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in (0, 0.5), got {logit_alpha}")
        if spec.dim < 2:
            raise ValueError("RealNVP needs at least 2 features to split between coupling halves")
        if spec.discrete:
            self.likelihood_kind = "lower_bound"  # log-mean-exp of p(x+u) bounds log P(x) from below
        self.dequant_draws, self.logit_alpha = dequant_draws, logit_alpha
        D = spec.dim
        image = spec.shape if net == "cnn" else None
        self.couplings = nn.ModuleList(Coupling(m, hidden, depth, dropout, image)
                                       for m in coupling_masks(spec, coupling_layers))
        make_norm = {"batchnorm": BatchNormFlow, "actnorm": ActNorm, "none": None}[norm]
        self.norms = nn.ModuleList(make_norm(D) for _ in range(coupling_layers)) if make_norm else None

    # ---- fixed preprocessing: raw data units <-> the flow's input space -------------------------------
    def preprocess(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (dequantised) values (B, D) to the flow's input space; returns (t, log|dt/dy|) per example."""
        if not self.spec.discrete:
            t, log_jac = self.normalise(y)
            return t, torch.full((y.shape[0],), log_jac, dtype=y.dtype)
        a, scale = self.logit_alpha, (1 - 2 * self.logit_alpha) / self.spec.levels
        s = a + scale * y
        t = torch.log(s) - torch.log1p(-s)
        log_jac = (math.log(scale) - torch.log(s) - torch.log1p(-s)).sum(-1)
        return t, log_jac

    def postprocess_inverse(self, t: Tensor) -> Tensor:
        """Inverse of ``preprocess`` back to raw units: discrete data get the dequantised value y = x + u."""
        if not self.spec.discrete:
            return self.denormalise(t)
        a, scale = self.logit_alpha, (1 - 2 * self.logit_alpha) / self.spec.levels
        return self.unflat((torch.sigmoid(t) - a) / scale)

    # ---- the bijection ----------------------------------------------------------------------------
    def flow_forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """z = f(t) and log|det df/dt| per example, (B, D) and (B,)."""
        logdet = torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
        for k, coupling in enumerate(self.couplings):
            t, ld = coupling(t)
            logdet = logdet + ld
            if self.norms is not None:
                t, ld = self.norms[k](t)
                logdet = logdet + ld
        return t, logdet

    def flow_inverse(self, z: Tensor) -> Tensor:
        for k in reversed(range(len(self.couplings))):
            if self.norms is not None:
                z = self.norms[k].inverse(z)
            z = self.couplings[k].inverse(z)
        return z

    def _log_density(self, y: Tensor) -> tuple[Tensor, Tensor]:
        t, log_jac = self.preprocess(y)
        z, logdet = self.flow_forward(t)
        log_base = -0.5 * (z.pow(2).sum(-1) + self.dim * LOG2PI)
        return z, log_base + logdet + log_jac

    # ---- deterministic graphs -------------------------------------------------------------------
    def transform(self, x: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z, log p) of x (continuous) or of the dequantised draw x + u (discrete, u (B, D) in [0, 1));
        log p in nats in raw data units, shape (B,)."""
        y = self.flat(x) if u is None else self.flat(x) + u
        return self._log_density(y)

    def inverse(self, z: Tensor) -> Tensor:
        """x = f^-1(z) in raw units, before rounding (discrete: the dequantised value; its cell is floor)."""
        return self.postprocess_inverse(self.flow_inverse(z))

    # ---- training -------------------------------------------------------------------------------
    def loss(self, x: Tensor) -> Tensor:
        """-E log p(x + u) with one uniform draw per example (torch's seeded generator), nats per example."""
        u = torch.rand(x.shape[0], self.dim, dtype=x.dtype, device=x.device) if self.spec.discrete else None
        return -self.transform(x, u)[1].mean()

    def forward(self, x: Tensor) -> Tensor:
        return self.loss(x)

    # ---- operations -------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, noise: Noise, draws: int | None = None, **options: Any) -> Tensor:
        """Exact log-density (continuous); discrete: the log-mean-exp bound log (1/K) sum_k p(x + u_k) over
        K = ``draws`` dequantisations (default ``dequant_draws``), a lower bound on log P(x) that tightens with
        K (genserve.core.bounds; evaluate and serve at the same K to compare). Noise order: K times
        ``noise.uniform(B, D)``; draws are added one by one in float64 as the server adds them. Not
        differentiable (evaluation only; ``loss`` trains on one draw)."""
        if not self.spec.discrete:
            return self.transform(x)[1]
        draws = int(draws or self.dequant_draws)
        bound = LogMeanExp(x.shape[0])
        for _ in range(draws):
            u = torch.from_numpy(noise.uniform(x.shape[0], self.dim)).to(x.device)
            bound.add(self.transform(x, u)[1].detach().double().cpu().numpy())
        return torch.from_numpy(bound.value()).float().to(x.device)

    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """Noise order: z = noise.normal(n, D) * temperature, then x = postprocess(f^-1(z))."""
        z = torch.from_numpy(noise.normal(n, self.dim)) * temperature
        return self.to_cells(self.inverse(z))

    def encode(self, x: Tensor, noise: Noise | None = None) -> Tensor:
        """z = f(x); discrete x is taken at the centre of its cell (u = 1/2), so decode(encode(x)) == x."""
        u = torch.full((x.shape[0], self.dim), 0.5) if self.spec.discrete else None
        return self.transform(x, u)[0]

    def decode(self, z: Tensor, noise: Noise | None = None) -> Tensor:
        return self.to_cells(self.inverse(z))

    def to_cells(self, y: Tensor) -> Tensor:
        """The data value of f^-1's output: discrete y lies in the cell [x, x + 1), so x = round(y - 1/2)."""
        return self.postprocess(y - 0.5 if self.spec.discrete else y)

    def program_parameters(self) -> dict[str, float]:
        return {"dequant_draws": self.dequant_draws}
