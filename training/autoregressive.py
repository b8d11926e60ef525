"""The autoregressive family's shared PyTorch part: exact log p(x) from per-position conditionals, D-step sampling.

p(x) = prod_i p(x_i | x_<i) over the row-major order of an example's values, or over another pixel order
(``order``, ``core.orders``: transpose, flips, rot180). ``AutoregressiveModel`` is the base of the built-in AR
models (``training.arcnn``: causal convolutions; ``training.arrnn``: a GRU); subclasses give
``ordered_conditionals(x)`` on the image permuted into their order, and the base class maps it to and from the
natural layout. Discrete data get a categorical per position, continuous data a Gaussian mixture per feature
in normalised units with the normalisation's Jacobian, so densities are in raw units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genserve.core.noise import Noise
from genserve.core.orders import ORDERS, check_order, order_positions
from genserve.core.spec import DataSpec
from genserve.training.augment import (
    DIHEDRAL,
    SHIFTS,
    check_square,
    dihedral_images,
    random_dihedral,
    random_shifts,
    shift_images,
)
from genserve.training.base import LOG2PI, Capabilities, GenerativeModel, categorical_from_uniform
from genserve.training.logistic_mixture import level_log_probs

MIN_LOG_SCALE = -7.0  # floor on mixture log-scales (normalised units): keeps densities finite


class AutoregressiveModel(GenerativeModel):
    """Shared part of the two AR models: conditionals -> exact log p(x), and D-step sequential sampling.

    Subclasses implement ``ordered_conditionals(x)``: the parameters of p(x_i | x_<i) for every position i in
    one pass, ``(logits,)`` of shape (B, D, levels) for discrete data or ``(logits, means, log_scales)``, each
    (B, D, K), of a Gaussian mixture in normalised units for continuous data, with i in the row-major order of
    the x they are given. ``conditionals(x)`` (the exported ``logits`` graph) takes x in its natural layout and
    gives the conditionals at the natural positions: with ``order`` (arch option, ``core.orders``) other than
    raster it permutes the image into the model's order first and the parameters back after, so step t of the
    model is the natural position ``positions[t]``, and log p(x) stays exact under that order.
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
        self.shift_aug = float(arch.get("shift_aug", 0.0))
        if not 0.0 <= self.shift_aug <= 1.0:
            raise ValueError(f"shift_aug is a probability in [0, 1], got {self.shift_aug}")
        if self.shift_aug and not (spec.is_image and spec.discrete):
            raise ValueError(f"shift_aug shifts discrete images, not data of shape {spec.shape}")
        self.shifts = SHIFTS
        self.dihedral_aug = float(arch.get("dihedral_aug", 0.0))
        if not 0.0 <= self.dihedral_aug <= 1.0:
            raise ValueError(f"dihedral_aug is a probability in [0, 1], got {self.dihedral_aug}")
        if self.dihedral_aug:
            if not (spec.is_image and spec.discrete):
                raise ValueError(f"dihedral_aug turns discrete images, not data of shape {spec.shape}")
            check_square(spec.shape)
        self.dihedral = DIHEDRAL
        self.order = str(arch.get("order", "raster"))
        check_order(self.order, spec.shape)
        if self.order != "raster" and not spec.discrete:
            raise ValueError(f"order {self.order!r} applies to discrete images; continuous data keep raster")
        # natural flat position of each step (not buffers: raster state dicts stay as they were)
        self.positions = order_positions(spec.shape, self.order).tolist()
        perm = torch.tensor(self.positions)
        self._perm, self._unperm = (None, None) if self.order == "raster" else (perm, torch.argsort(perm))

    @property
    def out_per_position(self) -> int:
        """Conditional parameters per position: levels logits, or 3K mixture parameters; a subclass with a
        ``logistic`` = K > 0 attribute (discretised-logistic head) 3K logistic-mixture parameters."""
        if getattr(self, "logistic", 0):
            return 3 * self.logistic
        return self.spec.levels if self.spec.discrete else 3 * self.components

    def conditionals(self, x: Tensor, shift: Tensor | None = None,
                     dihedral: Tensor | None = None) -> tuple[Tensor, ...]:
        """x (B, *shape) in its natural layout -> the conditional parameters at every natural position, (B, D, P)
        each; p(x_{positions[t]} | x_{positions[<t]}) sits at position positions[t]. ``shift`` (B,) long: index
        into ``self.shifts`` of the shift each image was given in training, ``dihedral`` (B,) long: index into
        ``self.dihedral`` of its symmetry (the conditioning inputs of the augmentations, applied in the natural
        layout); None is the identity, which every operation uses. ``dihedral`` reaches only models that take it
        (``dihedral_aug``), so ``ordered_conditionals`` of the others keeps its two arguments."""
        cond = (shift,) if dihedral is None else (shift, dihedral)
        if self._perm is None:
            return self.ordered_conditionals(x, *cond)
        xo = self.flat(x)[:, self._perm].reshape(x.shape)  # step t's value at row-major position t
        return tuple(p[:, self._unperm] for p in self.ordered_conditionals(xo, *cond))

    def ordered_conditionals(self, x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, ...]:
        """The network: x (B, *shape) whose row-major order is the model's order -> parameters (B, D, P) in
        that order (``conditionals``' shift; a model with ``dihedral_aug`` also takes its ``dihedral``)."""
        raise NotImplementedError

    def split_params(self, p: Tensor) -> tuple[Tensor, ...]:
        """(B, D, P) raw network outputs -> the conditional parameters (see the class docstring); with
        ``logistic`` the mixture's log-probabilities of every level, (B, D, levels), as the logits."""
        if getattr(self, "logistic", 0):
            return (level_log_probs(p, self.spec.levels),)
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
        """Mean NLL in nats; with ``shift_aug`` = p > 0 in training, each image is moved by one of the 8 one-pixel
        shifts with probability p and the model is told which (distribution augmentation, Jun et al. 2020):
        shifted digits teach the shared filters without pulling the identity's distribution, the one scored. With
        ``dihedral_aug`` = q > 0 each (shifted) image is then turned by one of the 7 non-identity symmetries of the
        square with probability q, and the model is told which as a second input."""
        if not (self.training and (self.shift_aug or self.dihedral_aug)):
            return -self.log_prob(x, Noise(0)).mean()
        shift = dihedral = None
        if self.shift_aug:
            shift = random_shifts(x.shape[0], self.shift_aug)
            x = shift_images(x, shift)
        if self.dihedral_aug:
            dihedral = random_dihedral(x.shape[0], self.dihedral_aug)
            x = dihedral_images(x, dihedral)
        return -conditional_log_prob(self.spec, self.flat(x), self.conditionals(x, shift, dihedral)).mean()

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

    def program_parameters(self) -> dict[str, float]:
        """The order for the server's sampler: ``order`` = its index in ``core.orders.ORDERS`` (none for raster,
        so raster manifests are as before)."""
        return {} if self.order == "raster" else {"order": float(ORDERS.index(self.order))}

    # ---- operations -------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, noise: Noise | None = None, **options: Any) -> Tensor:
        """Exact log p(x) in nats per example (B,); draws no noise."""
        return conditional_log_prob(self.spec, self.flat(x), self.conditionals(x))

    @torch.no_grad()
    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """D sequential steps, each one full ``conditionals`` pass on the partial sample; step i draws the natural
        position ``positions[i]`` (i itself in raster order).

        Noise order, for step i = 0..D-1: discrete ``u = noise.uniform(n)`` (inverse-CDF draw of x_i from
        softmax(logits_i / temperature)); continuous ``u = noise.uniform(n)`` (mixture component from
        softmax(logits_i / temperature)) then ``eps = noise.normal(n)``, x_i = mean + exp(log_scale) *
        temperature * eps in normalised units, mapped back to raw units.
        """
        x = torch.zeros(n, self.dim)
        for i in self.positions:
            params = [p[:, i] for p in self.conditionals(self.unflat(x))]
            x[:, i] = draw_position(self.spec, i, params, noise, temperature)
        return self.postprocess(self.unflat(x))


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
