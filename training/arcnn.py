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

The shared pieces (conditional densities, sequential sampling) live in ``training.autoregressive``, which
``training.arrnn`` uses too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.core.spec import DataSpec
from genserve.training.autoregressive import AutoregressiveModel


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
    """h + dropout(conv_B(relu(conv_B(relu(h))))); both convolutions masked B, so causality is kept.

    ``gated``: the first convolution makes two maps a, b per feature map and the block passes tanh(a) * sigmoid(b)
    on (the gated unit of PixelCNN, van den Oord et al., 2016b): the gate lets a map switch off where it does not
    apply. a and b are interleaved (maps 2i, 2i + 1) so that with C channel groups both fall in the group of map i.
    """

    def __init__(self, dims: int, channels: int, kernel: int, dilation: int, dropout: float, groups: int = 1,
                 gated: bool = False) -> None:
        super().__init__()
        if gated and channels % groups:
            raise ValueError(f"gated blocks need channels divisible by the image's {groups} channels, got {channels}")
        self.gated = gated
        self.conv1 = MaskedConv(dims, channels, 2 * channels if gated else channels, kernel, "B", dilation, groups)
        self.conv2 = MaskedConv(dims, channels, channels, 1, "B", groups=groups)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        if self.gated:
            ab = self.conv1(F.relu(h))
            u = torch.tanh(ab[:, 0::2]) * torch.sigmoid(ab[:, 1::2])
        else:
            u = F.relu(self.conv1(F.relu(h)))
        return h + self.drop(self.conv2(u))


class CausalConvAR(AutoregressiveModel):
    """Masked-convolution AR model (PixelCNN for images, causal 1-D convolutions for rows).

    Arguments:
        channels: feature maps per layer.
        layers: residual blocks with mask-B convolutions after the first mask-A layer.
        kernel: kernel of the residual blocks (odd).
        first_kernel: kernel of the mask-A layer; 0 means "spans the whole example" (no blind spot).
        dropout: dropout in the residual blocks and before the output layer.
        components: Gaussian mixture components per feature (continuous data only).
        logistic: discrete data: K > 0 puts a mixture of K discretised logistics on the levels instead of a free
            logit per level (``training.logistic_mixture``); the conditionals are still log-probabilities over
            levels, so export and serving are unchanged (0: the categorical).
        gated: gated residual blocks (tanh(a) * sigmoid(b) instead of relu; see ``ResidualBlock``).
        order: images: the pixel order (``core.orders``: raster, transpose, flip_h, flip_v, rot180); the masks
            stay raster's and run on the image permuted into that order (``AutoregressiveModel.conditionals``).
        lr_half_life: optimizer steps per halving of the learning rate (0: constant); a training setting, kept
            here because the trainer has no schedules.
        ema: decay per step of a moving average of the weights, used in eval mode (0: off).
        shift_aug: training moves images by one pixel with this probability and tells the model the shift (a
            learned bias per shift on the first layer's maps and on the output); scoring and sampling use the
            identity's, so the exported graph is the same function of x (0: off).

    Example:
        >>> from genserve.core.noise import Noise
        >>> from genserve.training.data import load_dataset
        >>> m = CausalConvAR(load_dataset("digits").spec, channels=8, layers=1)
        >>> m.sample(2, Noise(0)).shape
        torch.Size([2, 8, 8])
    """

    name = "arcnn"
    profiles = {
        "quick": {"epochs": 25, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "grad_clip": 5.0,
                  "patience": 5, "arch": {"channels": 32, "layers": 2, "dropout": 0.1}},
        # full (docs/results/quality.md): one-pixel shift augmentation given as input, an EMA of the weights and a
        # halving learning rate; 6 gated blocks of 128 maps and a 5-logistic mixture on the levels; best validation
        # epoch 51 (81.44; 82.67 with 4 plain blocks of 96 maps and the categorical)
        "full": {"epochs": 300, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 5.0,
                 "patience": 30, "arch": {"channels": 128, "layers": 6, "dropout": 0.3, "shift_aug": 0.5,
                                          "ema": 0.999, "lr_half_life": 2000, "logistic": 5, "gated": True}},
    }
    tabular_profiles = {
        "quick": {"epochs": 30, "batch_size": 128, "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 5.0,
                  "patience": 10, "arch": {"channels": 32, "layers": 2, "dropout": 0.0, "components": 8}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 5.0,
                 "patience": 30, "arch": {"channels": 64, "layers": 3, "dropout": 0.0, "components": 10}},
    }

    def __init__(self, spec: DataSpec, channels: int = 64, layers: int = 4, kernel: int = 3, first_kernel: int = 0,
                 dropout: float = 0.2, components: int = 8, lr_half_life: int = 0, ema: float = 0.0,
                 shift_aug: float = 0.0, logistic: int = 0, gated: bool = False, order: str = "raster") -> None:
        if logistic < 0 or (logistic and not spec.discrete):
            raise ValueError(f"logistic is a number of mixture components >= 0 for discrete data, got {logistic} "
                             f"for {'discrete' if spec.discrete else 'continuous'} data")
        self.logistic = logistic  # before the base class, which asks out_per_position
        # options off: arch as before
        extra = {k: v for k, v in (("logistic", logistic), ("gated", gated), ("order", order != "raster" and order))
                 if v}
        super().__init__(spec, channels=channels, layers=layers, kernel=kernel, first_kernel=first_kernel,
                         dropout=dropout, components=components, lr_half_life=lr_half_life, ema=ema,
                         shift_aug=shift_aug, **extra)
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
            ResidualBlock(dims, channels, kernel, 1 if dims == 2 else 2 ** (i % 4), dropout, groups, gated)
            for i in range(layers)
        )
        self.drop = nn.Dropout(dropout)
        # output maps channel-major: maps c * P .. (c + 1) * P - 1 hold the P parameters of data channel c
        self.out = MaskedConv(dims, channels, groups * self.out_per_position, 1, "B", groups=groups)
        # Per-position bias: digits' border pixels are almost always 0, which a convolution alone models poorly
        self.position_bias = nn.Parameter(torch.zeros(self.out_per_position, spec.dim))
        if shift_aug:  # the shift as conditioning input: zero at first, so every shift starts as the identity
            self.shift_maps = nn.Parameter(torch.zeros(len(self.shifts), channels))
            self.shift_bias = nn.Parameter(torch.zeros(len(self.shifts), self.out_per_position, spec.dim))
        self._setup_averaging()

    def ordered_conditionals(self, x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, ...]:
        """x (B, *shape) raw units, permuted into the model's order -> conditional parameters of every position in
        that order, (B, D, P) each; ``shift`` as in ``AutoregressiveModel.conditionals``."""
        B, C, P = x.shape[0], self.groups, self.out_per_position
        if C == 1:
            h = self.model_input(x).reshape(B, 1, *self.spec.shape[:2] if self.dims == 2 else self.spec.shape)
        else:  # channels-last data to the (B, C, H, W) layout of convolutions
            h = self.model_input(x).reshape(B, *self.spec.shape).permute(0, 3, 1, 2)
        h = self.inp(h)
        bias = self.position_bias
        if self.shift_aug:
            if shift is None:  # the identity: constants in the exported graph
                h = h + self.shift_maps[0].reshape(1, -1, *(1,) * self.dims)
                bias = bias + self.shift_bias[0]
            else:
                h = h + self.shift_maps[shift].reshape(B, -1, *(1,) * self.dims)
                bias = bias + self.shift_bias[shift]
        for block in self.blocks:
            h = block(h)
        p = self.out(self.drop(F.relu(h)))
        if C == 1:
            p = p.reshape(B, P, self.dim)
        else:  # (B, C * P, H, W) -> (B, P, D) with D in the data's (H, W, C) order
            p = p.reshape(B, C, P, *self.spec.shape[:2]).permute(0, 2, 3, 4, 1).reshape(B, P, self.dim)
        return self.split_params((p + bias).transpose(1, 2))
