"""Causal-convolution autoregressive model: PixelCNN-style masked convolutions, exact likelihood.

p(x) = prod_i p(x_i | x_<i) over the raster order of the pixels (or the feature order of a tabular row).
Images use masked 2-D convolutions (van den Oord et al., 2016): a first layer with mask A (the centre pixel
excluded) whose kernel spans the whole image, so there is no blind spot, then residual layers with mask B.
Images with C channels (channels-last (H, W, C): raster order over H, W, then C, so R, G, B of a pixel come
in turn) split every layer's feature maps into C groups, one per data channel; at the centre pixel group g sees
the groups before it (mask A) or up to itself (mask B), so the logits of channel c see channels < c of the
same pixel and everything of the pixels before it, as PixelCNN's colour masks do.
Tabular rows use the same construction in 1-D (causal convolutions over the feature order). Discrete data get
a categorical conditional over ``spec.levels``; continuous data a mixture of Gaussians per feature in the
normalised space, with the normalisation's Jacobian so that densities are in raw units.

The shared pieces (conditional densities, sequential sampling) live in ``AutoregressiveModel`` here;
``training.arrnn`` reuses them for the recurrent model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.base import LOG2PI, Capabilities, GenerativeModel, categorical_from_uniform

MIN_LOG_SCALE = -7.0  # floor on mixture log-scales (normalised units): keeps densities finite


class AutoregressiveModel(GenerativeModel):
    """Shared part of the two AR models: conditionals -> exact log p(x), and D-step sequential sampling.

    Subclasses implement ``conditionals(x)``: the parameters of p(x_i | x_<i) for every position i in one
    pass, ``(logits,)`` of shape (B, D, levels) for discrete data or ``(logits, means, log_scales)``, each
    (B, D, K), of a Gaussian mixture in normalised units for continuous data.
    """

    family = "autoregressive"
    likelihood_kind = "exact"
    operations = ("sample", "log_likelihood")
    capabilities = Capabilities("autoregressive", "stable", "exact", "slow", "lossless", False)

    def __init__(self, spec: DataSpec, **arch: Any) -> None:
        super().__init__(spec, **arch)
        if not spec.discrete and not spec.mean:
            raise ValueError("continuous data need the spec's mean/std (taken from the training split)")
        self.components = int(arch.get("components", 0)) if not spec.discrete else 0
        self.lr_half_life = int(arch.get("lr_half_life", 0))
        self.ema = float(arch.get("ema", 0.0))
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema is a decay per step in [0, 1), got {self.ema}")
        self._ema_names: dict[str, str] = {}
        if not spec.discrete and self.components < 1:
            raise ValueError(f"continuous data need components >= 1, got {self.components}")

    @property
    def out_per_position(self) -> int:
        """Conditional parameters per position: levels logits, or 3K mixture parameters."""
        return self.spec.levels if self.spec.discrete else 3 * self.components

    def conditionals(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def split_params(self, p: Tensor) -> tuple[Tensor, ...]:
        """(B, D, P) raw network outputs -> the conditional parameters (see the class docstring)."""
        if self.spec.discrete:
            return (p,)
        k = self.components
        return p[..., :k], p[..., k:2 * k], torch.clamp(p[..., 2 * k:], min=MIN_LOG_SCALE)

    def model_input(self, x: Tensor) -> Tensor:
        """(B, D) network input: levels scaled to [-1, 1], or normalised values for continuous data."""
        if self.spec.discrete:
            return self.flat(x) * (2.0 / (self.spec.levels - 1)) - 1.0
        return self.normalise(x)[0]

    # ---- training -------------------------------------------------------------------------------
    def loss(self, x: Tensor) -> Tensor:
        return -self.log_prob(x, Noise(0)).mean()

    def forward(self, x: Tensor) -> Tensor:  # the trainer (and DDP) may call the model itself
        return self.loss(x)

    def make_optimizers(self, lr: float, weight_decay: float) -> list[torch.optim.Optimizer]:
        """AdamW; with ``lr_half_life`` > 0 the learning rate halves every that many steps, down to lr / 20;
        with ``ema`` > 0 each step also updates the moving average of the weights.

        Both live in hooks on the optimizer's step (so they work under DDP and the trainer's default step), and
        the decayed ``lr`` is part of the optimizer's state, so a resumed run continues it.
        """
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        if self.lr_half_life > 0:
            gamma, floor = 0.5 ** (1.0 / self.lr_half_life), lr / 20

            def decay(optimizer: torch.optim.Optimizer, *_: Any) -> None:
                for group in optimizer.param_groups:
                    group["lr"] = max(group["lr"] * gamma, floor)

            opt.register_step_post_hook(decay)
        if self._ema_names:
            opt.register_step_post_hook(lambda *_: self._update_average())
        return [opt]

    # ---- weight averaging: training steps move the raw weights, eval mode answers with their average ----
    def _setup_averaging(self) -> None:
        """Buffers for the moving average of every weight (when ``ema`` > 0); called once the layers exist."""
        if self.ema <= 0:
            return
        for name, p in list(self.named_parameters()):
            self._ema_names[name] = "ema_" + name.replace(".", "_")
            self.register_buffer(self._ema_names[name], p.detach().clone())
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        # True while the parameters hold the average (eval mode) and the buffers the raw weights; it travels in
        # the state dict, so a checkpoint taken in eval mode loads as the averaged model.
        self.register_buffer("ema_active", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _update_average(self) -> None:
        n = int(self.ema_steps)
        decay = min(self.ema, (1 + n) / (10 + n))  # short memory at first, so early weights fade quickly
        params = dict(self.named_parameters())
        for name, buffer_name in self._ema_names.items():
            getattr(self, buffer_name).lerp_(params[name], 1.0 - decay)
        self.ema_steps += 1

    def train(self, mode: bool = True) -> AutoregressiveModel:
        super().train(mode)
        if self._ema_names and int(self.ema_steps) > 0 and bool(self.ema_active) == mode:
            self._swap_average()
        return self

    @torch.no_grad()
    def _swap_average(self) -> None:
        params = dict(self.named_parameters())
        for name, buffer_name in self._ema_names.items():
            p, avg = params[name], getattr(self, buffer_name)
            raw = p.detach().clone()
            p.copy_(avg)
            avg.copy_(raw)
        self.ema_active.fill_(not bool(self.ema_active))

    # ---- operations -------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, noise: Noise | None = None, **options: Any) -> Tensor:
        """Exact log p(x) in nats per example (B,); draws no noise."""
        return conditional_log_prob(self.spec, self.flat(x), self.conditionals(x))

    @torch.no_grad()
    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """D sequential steps, each one full ``conditionals`` pass on the partial sample.

        Noise order, for step i = 0..D-1: discrete ``u = noise.uniform(n)`` (inverse-CDF draw of x_i from
        softmax(logits_i / temperature)); continuous ``u = noise.uniform(n)`` (mixture component from
        softmax(logits_i / temperature)) then ``eps = noise.normal(n)``, x_i = mean + exp(log_scale) *
        temperature * eps in normalised units, mapped back to raw units.
        """
        x = torch.zeros(n, self.dim)
        for i in range(self.dim):
            params = [p[:, i] for p in self.conditionals(self.unflat(x))]
            x[:, i] = draw_position(self.spec, i, params, noise, temperature)
        return self.postprocess(self.unflat(x))

    def example_input(self, batch: int) -> Tensor:
        """A batch of valid examples for tracing graphs."""
        g = torch.Generator().manual_seed(0)
        if self.spec.discrete:
            return torch.randint(0, self.spec.levels, (batch, *self.spec.shape), generator=g).float()
        mean, std = torch.tensor(self.spec.mean), torch.tensor(self.spec.std)
        return self.unflat(mean + std * torch.randn(batch, self.dim, generator=g))


def conditional_log_prob(spec: DataSpec, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """sum_i log p(x_i | x_<i) in nats, (B,), for flat x (B, D) in raw units."""
    if spec.discrete:
        logp = F.log_softmax(params[0], dim=-1)
        return logp.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).sum(-1)
    logits, means, log_scales = params
    mean, std = torch.tensor(spec.mean, dtype=x.dtype), torch.tensor(spec.std, dtype=x.dtype)
    y = ((x - mean) / std).unsqueeze(-1)
    z = (y - means) * torch.exp(-log_scales)
    comp = F.log_softmax(logits, dim=-1) - 0.5 * z * z - log_scales - 0.5 * LOG2PI
    return torch.logsumexp(comp, dim=-1).sum(-1) - torch.log(std).sum()


def draw_position(spec: DataSpec, i: int, params: list[Tensor], noise: Noise, temperature: float) -> Tensor:
    """Draw x_i (n,) in raw units from its conditional parameters, consuming noise as ``sample`` documents."""
    n = params[0].shape[0]
    u = torch.from_numpy(noise.uniform(n))
    # float32 constants and a multiplication by 1/T, exactly as the numpy program computes them
    inv_t, temp = torch.tensor(1.0 / temperature, dtype=torch.float32), torch.tensor(temperature, dtype=torch.float32)
    if spec.discrete:
        return categorical_from_uniform(params[0] * inv_t, u)
    logits, means, log_scales = params
    k = categorical_from_uniform(logits * inv_t, u).long().unsqueeze(-1)
    eps = torch.from_numpy(noise.normal(n))
    mu, log_s = means.gather(-1, k).squeeze(-1), log_scales.gather(-1, k).squeeze(-1)
    y = mu + torch.exp(log_s) * (eps * temp)
    std, mean = (torch.tensor(v[i], dtype=torch.float32) for v in (spec.std, spec.mean))
    return y * std + mean


class MaskedConv(nn.Module):
    """A 1-D or 2-D convolution whose kernel sees only earlier positions (mask A) or also the centre (B).

    "Earlier" is raster order: rows above, and the same row to the left. 1-D convolutions are dilated. With
    ``groups`` = C > 1 (images of C channels) input and output feature maps are split into C consecutive
    groups, and at the centre an output of group g sees input groups < g (mask A) or <= g (mask B).
    """

    def __init__(self, dims: int, cin: int, cout: int, kernel: int, mask: str, dilation: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {kernel}")
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        c = kernel // 2
        m = torch.ones(kernel, kernel)
        m[c, c + (mask == "B"):] = 0  # the centre row: the centre itself (mask A) and what follows
        m[c + 1:] = 0  # rows below
        m = m if dims == 2 else m[c]
        if groups > 1:  # (cout, cin, k, k): the centre tap connects channel groups in order
            if dims != 2 or min(cin, cout) < groups:
                raise ValueError(f"channel groups need 2-D convolutions with >= {groups} maps in and out, got "
                                 f"{dims}-D, {cin} in, {cout} out")
            g_out = torch.arange(cout) * groups // cout
            g_in = torch.arange(cin) * groups // cin
            centre = (g_in[None, :] <= g_out[:, None]) if mask == "B" else (g_in[None, :] < g_out[:, None])
            m = m.expand(cout, cin, kernel, kernel).clone()
            m[:, :, c, c] = centre.float()
        self.register_buffer("mask", m)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv._conv_forward(h, self.conv.weight * self.mask, self.conv.bias)


class ResidualBlock(nn.Module):
    """h + dropout(conv_B(relu(conv_B(relu(h))))); both convolutions masked B, so causality is kept."""

    def __init__(self, dims: int, channels: int, kernel: int, dilation: int, dropout: float, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = MaskedConv(dims, channels, channels, kernel, "B", dilation, groups)
        self.conv2 = MaskedConv(dims, channels, channels, 1, "B", groups=groups)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.drop(self.conv2(F.relu(self.conv1(F.relu(h)))))


class CausalConvAR(AutoregressiveModel):
    """Masked-convolution AR model (PixelCNN for images, causal 1-D convolutions for rows).

    Arguments:
        channels: feature maps per layer.
        layers: residual blocks with mask-B convolutions after the first mask-A layer.
        kernel: kernel of the residual blocks (odd).
        first_kernel: kernel of the mask-A layer; 0 means "spans the whole example" (no blind spot).
        dropout: dropout in the residual blocks and before the output layer.
        components: Gaussian mixture components per feature (continuous data only).
        lr_half_life: optimizer steps per halving of the learning rate (0: constant); a training setting, kept
            here because the trainer has no schedules.
        ema: decay per step of a moving average of the weights, used in eval mode (0: off).

    Example:
        >>> from genserve.training.data import load_dataset
        >>> m = CausalConvAR(load_dataset("digits").spec, channels=8, layers=1)
        >>> m.sample(2, Noise(0)).shape
        torch.Size([2, 8, 8])
    """

    name = "arcnn"
    profiles = {
        "quick": {"epochs": 25, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "grad_clip": 5.0,
                  "patience": 5, "arch": {"channels": 32, "layers": 2, "dropout": 0.1}},
        "full": {"epochs": 200, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 5.0,
                 "patience": 20, "arch": {"channels": 64, "layers": 4, "dropout": 0.3}},
    }
    tabular_profiles = {
        "quick": {"epochs": 30, "batch_size": 128, "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 5.0,
                  "patience": 10, "arch": {"channels": 32, "layers": 2, "dropout": 0.0, "components": 8}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 5.0,
                 "patience": 30, "arch": {"channels": 64, "layers": 3, "dropout": 0.0, "components": 10}},
    }

    def __init__(self, spec: DataSpec, channels: int = 64, layers: int = 4, kernel: int = 3, first_kernel: int = 0,
                 dropout: float = 0.2, components: int = 8, lr_half_life: int = 0, ema: float = 0.0) -> None:
        super().__init__(spec, channels=channels, layers=layers, kernel=kernel, first_kernel=first_kernel,
                         dropout=dropout, components=components, lr_half_life=lr_half_life, ema=ema)
        dims = 2 if spec.is_image else 1
        if len(spec.shape) > 1 and not spec.is_image:
            raise ValueError(f"arcnn models images (H, W) or (H, W, C) with C in 1..4, or rows (D,), not shape "
                             f"{spec.shape}")
        groups = spec.channels or 1  # data channels of an image: one group of feature maps per channel
        if channels < groups:
            raise ValueError(f"channels must be >= the image's {groups} channels (one group each), got {channels}")
        span = 2 * max(spec.shape[:2]) - 1  # a centred kernel this wide sees every earlier position
        self.dims, self.groups = dims, groups
        self.inp = MaskedConv(dims, groups, channels, first_kernel or span, "A", groups=groups)
        # 1-D rows: dilations 1, 2, 4, ... widen the receptive field; images see everything from layer one
        self.blocks = nn.ModuleList(
            ResidualBlock(dims, channels, kernel, 1 if dims == 2 else 2 ** (i % 4), dropout, groups)
            for i in range(layers)
        )
        self.drop = nn.Dropout(dropout)
        # output maps channel-major: maps c * P .. (c + 1) * P - 1 hold the P parameters of data channel c
        self.out = MaskedConv(dims, channels, groups * self.out_per_position, 1, "B", groups=groups)
        # Per-position bias: digits' border pixels are almost always 0, which a convolution alone models poorly
        self.position_bias = nn.Parameter(torch.zeros(self.out_per_position, spec.dim))
        self._setup_averaging()

    def conditionals(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (B, *shape) raw units -> conditional parameters of every position, (B, D, P) each."""
        B, C, P = x.shape[0], self.groups, self.out_per_position
        if C == 1:
            h = self.model_input(x).reshape(B, 1, *self.spec.shape[:2] if self.dims == 2 else self.spec.shape)
        else:  # channels-last data to the (B, C, H, W) layout of convolutions
            h = self.model_input(x).reshape(B, *self.spec.shape).permute(0, 3, 1, 2)
        h = self.inp(h)
        for block in self.blocks:
            h = block(h)
        p = self.out(self.drop(F.relu(h)))
        if C == 1:
            p = p.reshape(B, P, self.dim)
        else:  # (B, C * P, H, W) -> (B, P, D) with D in the data's (H, W, C) order
            p = p.reshape(B, C, P, *self.spec.shape[:2]).permute(0, 2, 3, 4, 1).reshape(B, P, self.dim)
        return self.split_params((p + self.position_bias).transpose(1, 2))
