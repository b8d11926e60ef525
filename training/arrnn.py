"""Recurrent autoregressive model: a GRU over the raster order of the pixels, exact likelihood.

At step t the GRU reads x_{t-1} (a start token at t = 0) together with an embedding of the position t, and its
output gives p(x_t | x_<t): categorical over ``spec.levels`` for discrete data, a Gaussian mixture in
normalised units for continuous rows (as in ``training.arcnn``). With ``above`` (images) a step also reads the
pixel above, x_{t-W}, which the step state carries in a row buffer of the last W values after the GRU units:
the GRU no longer has to hold a whole row in memory, which the 1000 training digits cannot teach it well.
Images with channels (channels-last (H, W, C)) are read in that row-major order, the C values of a pixel in turn,
and the row buffer holds W * C values, so "above" is the same channel of the pixel above.

Two graphs are exported: ``logits`` (all conditionals in one pass, for the likelihood) and ``step`` (x_prev,
h, t -> conditionals of x_t and h_next), so that sampling costs D steps rather than D passes over the growing
prefix. The step graph spells out the GRU cell with the weights of ``nn.GRU``, a plain, batch-dynamic sequence
of matmuls; the position input t tells the step where it is (start token, position embedding, row buffer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.autoregressive import AutoregressiveModel, draw_position


class RecurrentAR(AutoregressiveModel):
    """GRU autoregressive model.

    Arguments:
        hidden: GRU state size per layer.
        layers: stacked GRU layers.
        embed: size of the input embedding (previous value plus position).
        dropout: dropout on the embedding, between GRU layers and before the output layer.
        weight_drop: DropConnect rate on the GRU's hidden-to-hidden weights during training.
        input_drop: rate at which training reads a previous value as "unknown" (word dropout).
        above: images only: each step also reads the pixel above, kept in a row buffer in the state.
        window: with ``above``: each step reads the whole row buffer, x_{t-W} .. x_{t-1} (the previous row from
            the pixel above rightwards, and the current row so far), an embedding per offset, summed; the state
            is the same as with ``above`` alone.
        logistic: K > 0 puts a mixture of K discretised logistics on the levels instead of a free logit per
            level (``training.logistic_mixture``, as arcnn's); the conditionals are still log-probabilities over
            the levels, so export and serving are unchanged (0: the categorical).
        components: Gaussian mixture components per feature (continuous data only).
        order: images: the pixel order (``core.orders``: raster, transpose, flip_h, flip_v, rot180); the GRU and
            its row buffer run over the image permuted into that order, and ``step``'s t counts steps of that
            order (step t gives the conditional of the natural position ``positions[t]``).
        lr_half_life: optimizer steps per halving of the learning rate (0: constant); a training setting, kept
            here because the trainer has no schedules.
        ema: decay per step of a moving average of the weights, used in eval mode (0: off).
        shift_aug: images only: training moves images by one pixel with this probability and tells the model the
            shift (a learned vector per shift added to every step's input, a learned output bias per shift);
            scoring, the step graph and sampling use the identity's (0: off).
        dihedral_aug: square images only: training turns images by one of the 7 non-identity symmetries of the
            square (``training.augment.DIHEDRAL``: rotations, flips, transpositions) with this probability and
            tells the model which (a learned vector per symmetry added to every step's input, a learned output
            bias per symmetry, both zero at first, summed with the shift's); scoring, the step graph and sampling
            use the identity's (0: off).

    Example:
        >>> from genserve.training.data import load_dataset
        >>> m = RecurrentAR(load_dataset("digits").spec, hidden=16, layers=1)
        >>> m.sample(2, Noise(0)).shape
        torch.Size([2, 8, 8])
    """

    name = "arrnn"
    profiles = {
        "quick": {"epochs": 12, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "grad_clip": 5.0,
                  "patience": 5, "arch": {"hidden": 128, "layers": 1, "embed": 32, "dropout": 0.1}},
        # full: + one-pixel shift augmentation given as input (docs/results/quality.md): validation 81.9 -> 81.32,
        # test 79.47 -> 79.44; GRU layers of 256 instead of 192: validation 81.32 -> 81.05 (best epoch 110),
        # ~570 s CPU (neither window nor a 5-logistic head helped: 82.21 and 81.43 at 192). + the square's
        # 8 symmetries as a second conditioning input (dihedral_aug 0.5): validation 81.03 at 120 epochs (still
        # falling), 80.66 with 140 epochs and the lr half-life stretched to 1150 steps; then dropout 0.5 -> 0.4:
        # 79.75, -> 0.3: 79.53 (best epoch 140), test 77.91 (was 79.36), ~790 s CPU; weight decay 0.05 -> 0.2
        # with dropout 0.4 (helper-26's probe): 79.30 (best epoch 140), test 77.34, ~830 s CPU
        "full": {"epochs": 140, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.2, "grad_clip": 5.0,
                 "patience": 20, "arch": {"hidden": 256, "layers": 2, "embed": 64, "dropout": 0.4, "weight_drop": 0.25,
                                          "above": True, "ema": 0.999, "lr_half_life": 1150, "shift_aug": 0.5,
                                          "dihedral_aug": 0.5}},
    }
    tabular_profiles = {
        "quick": {"epochs": 30, "batch_size": 128, "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 5.0,
                  "patience": 10, "arch": {"hidden": 64, "layers": 1, "embed": 16, "dropout": 0.0, "components": 8}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 5.0,
                 "patience": 30, "arch": {"hidden": 128, "layers": 1, "embed": 32, "dropout": 0.0, "components": 10}},
    }

    def __init__(self, spec: DataSpec, hidden: int = 256, layers: int = 1, embed: int = 64, dropout: float = 0.2,
                 weight_drop: float = 0.0, input_drop: float = 0.0, above: bool = False, components: int = 8,
                 lr_half_life: int = 0, ema: float = 0.0, shift_aug: float = 0.0, window: bool = False,
                 logistic: int = 0, order: str = "raster", dihedral_aug: float = 0.0) -> None:
        if logistic < 0 or (logistic and not spec.discrete):
            raise ValueError(f"logistic is a number of mixture components >= 0 for discrete data, got {logistic} "
                             f"for {'discrete' if spec.discrete else 'continuous'} data")
        if window and not above:
            raise ValueError("window=True reads the row buffer that above=True keeps: set above too")
        self.logistic = logistic  # before the base class: its out_per_position and split_params read it
        # options off: arch as before
        extra = {k: v for k, v in (("window", window), ("logistic", logistic), ("order", order != "raster" and order),
                                   ("dihedral_aug", dihedral_aug)) if v}
        super().__init__(spec, hidden=hidden, layers=layers, embed=embed, dropout=dropout, weight_drop=weight_drop,
                         input_drop=input_drop, above=above, components=components, lr_half_life=lr_half_life,
                         ema=ema, shift_aug=shift_aug, **extra)
        self.hidden, self.layers, self.weight_drop, self.input_drop = hidden, layers, weight_drop, input_drop
        if above and not (spec.is_image and spec.discrete):
            raise ValueError(f"above=True reads the pixel above, so it needs discrete images, not shape {spec.shape}")
        # values of the row buffer carried in the state: one image row, W pixels of C channels (channels-last),
        # so x_{t - width} is the same channel of the pixel above
        self.width = spec.shape[1] * spec.channels if above else 0
        if spec.discrete:  # index `levels` is the start token (also "unknown": dropped inputs, no row above)
            self.value_embed = nn.Embedding(spec.levels + 1, embed)
            self.above_embed = nn.Embedding(spec.levels + 1, embed) if above else None
            # window: one table of levels + 1 rows per offset j = 2 .. width - 1 (x_{t-1}: value_embed, x_{t-W}:
            # above_embed), stacked in one embedding
            self.window_embed = nn.Embedding((self.width - 2) * (spec.levels + 1), embed) if window else None
        else:
            self.value_embed = nn.Linear(1, embed)
            self.start = nn.Parameter(torch.zeros(embed))
            self.window_embed = None
        self.position_embed = nn.Embedding(self.dim, embed)
        self.gru = nn.GRU(embed, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, self.out_per_position)
        self.position_bias = nn.Parameter(torch.zeros(self.dim, self.out_per_position))
        if shift_aug:  # the shift as conditioning input: zero at first, so every shift starts as the identity
            self.shift_embed = nn.Parameter(torch.zeros(len(self.shifts), embed))
            self.shift_bias = nn.Parameter(torch.zeros(len(self.shifts), self.dim, self.out_per_position))
        if self.dihedral_aug:  # the symmetry as a second conditioning input, zero at first as the shift's
            self.dihedral_embed = nn.Parameter(torch.zeros(len(self.dihedral), embed))
            self.dihedral_bias = nn.Parameter(torch.zeros(len(self.dihedral), self.dim, self.out_per_position))
        self._setup_averaging()

    @property
    def state_size(self) -> int:
        """Size of the flat state carried between steps: layers * hidden GRU units, then (``above``) the last
        ``width`` values, a row buffer from which each step reads the pixel above."""
        return self.layers * self.hidden + self.width

    def _embed(self, x_prev: Tensor, t: Tensor, x_above: Tensor | None = None, blank: Tensor | None = None,
               between: Tensor | None = None) -> Tensor:
        """x_prev (...,) raw units, integer positions t (...,), the pixel above (``above`` only), ``between`` (...,
        width - 2) = x_{t-W+1} .. x_{t-2} (``window`` only) -> GRU inputs (..., embed). t = 0 reads the start
        token, as do inputs marked ``blank`` (input dropout); values before the image read it too."""
        first = t == 0 if blank is None else (t == 0) | blank
        if self.spec.discrete:
            top = self.spec.levels - 1  # clamped: a graph fed values off the levels still gathers valid rows
            e = self.value_embed(torch.where(first, self.spec.levels, x_prev.long().clamp(0, top)))
            if self.above_embed is not None:
                above = torch.where(t < self.width, self.spec.levels, x_above.long().clamp(0, top))
                e = e + self.above_embed(above)
            if self.window_embed is not None:  # offsets j = W-1 .. 2 in buffer order; t - j < 0: the start token
                j = torch.arange(self.width - 1, 1, -1)
                v = torch.where(t.unsqueeze(-1) < j, self.spec.levels, between.long().clamp(0, top))
                e = e + self.window_embed(v + (j - 2) * (self.spec.levels + 1)).sum(-2)
        else:
            y = (x_prev - torch.tensor(self.spec.mean)[t]) / torch.tensor(self.spec.std)[t]
            e = torch.where(first.unsqueeze(-1), self.start, self.value_embed(y.unsqueeze(-1)))
        return self.drop(e + self.position_embed(t))

    def ordered_conditionals(self, x: Tensor, shift: Tensor | None = None,
                             dihedral: Tensor | None = None) -> tuple[Tensor, ...]:
        """x (B, *shape) raw units, permuted into the model's order -> conditional parameters of every position in
        that order in one GRU pass, (B, D, P) each; ``shift`` and ``dihedral`` as in
        ``AutoregressiveModel.conditionals``."""
        B, D = x.shape[0], self.dim
        flat = self.flat(x)
        prev = torch.cat([torch.zeros(B, 1, dtype=flat.dtype), flat[:, :-1]], dim=1)  # x_{t-1}; t=0 is masked
        t = torch.arange(D).expand(B, D)
        padded = torch.cat([torch.zeros(B, self.width, dtype=flat.dtype), flat[:, :-1]], dim=1)  # x_{t-W} at t
        above = padded[:, :D]
        # (B, D, W - 2): x_{t-W+1} .. x_{t-2}, the row buffer between the pixel above and x_{t-1}
        between = padded.unfold(1, self.width, 1)[:, :D, 1:-1] if self.window_embed is not None else None
        # word dropout (Bowman et al., 2016): training reads some previous values as "unknown"
        blank = torch.rand(B, D) < self.input_drop if self.training and self.input_drop > 0 else None
        inp = self._embed(prev, t, above, blank, between)
        bias = self.position_bias
        if self.shift_aug:
            k = torch.zeros(B, dtype=torch.long) if shift is None else shift
            inp, bias = inp + self.shift_embed[k].unsqueeze(1), bias + self.shift_bias[k]
        if self.dihedral_aug:
            g = torch.zeros(B, dtype=torch.long) if dihedral is None else dihedral
            inp, bias = inp + self.dihedral_embed[g].unsqueeze(1), bias + self.dihedral_bias[g]
        if self.training and self.weight_drop > 0:
            # DropConnect on the recurrent weights (Merity et al., AWD-LSTM): one mask per batch, shared by all steps
            weights = {k: F.dropout(w, self.weight_drop) if k.startswith("weight_hh") else w
                       for k, w in self.gru.named_parameters()}
            o, _ = torch.func.functional_call(self.gru, weights, (inp,))
        else:
            o, _ = self.gru(inp)
        return self.split_params(self.out(self.drop(o)) + bias)

    def step(self, x_prev: Tensor, h: Tensor, t: Tensor) -> tuple[Tensor, ...]:
        """One GRU step: x_prev (B, 1) raw value of step t-1 (ignored at t = 0), h (B, state_size) state after
        steps < t-1, t (B, 1) step as a float -> (conditional parameters of step t, each (B, P'), h'). Steps
        count the model's order: step t is the natural position ``positions[t]``."""
        t = t[:, 0].long()
        units = self.layers * self.hidden
        row = torch.cat([h[:, units:], x_prev], dim=1)  # x_{t-1-width} .. x_{t-1}; row[:, 1] is above x_t
        between = row[:, 2:-1] if self.window_embed is not None else None  # x_{t-W+1} .. x_{t-2}
        inp = self._embed(x_prev[:, 0], t, row[:, 1] if self.width else None, between=between)
        bias = self.position_bias[t]
        if self.shift_aug:  # the identity's conditioning, as scoring uses
            inp, bias = inp + self.shift_embed[0], bias + self.shift_bias[0][t]
        if self.dihedral_aug:
            inp, bias = inp + self.dihedral_embed[0], bias + self.dihedral_bias[0][t]
        states = []
        for layer in range(self.layers):
            hl = h[:, layer * self.hidden:(layer + 1) * self.hidden]
            hl = self._gru_cell(inp, hl, layer)
            states.append(hl)
            inp = self.drop(hl) if layer < self.layers - 1 else hl
        p = self.out(self.drop(inp)) + bias
        return (*self.split_params(p), torch.cat([*states, row[:, 1:]], dim=1))

    def _gru_cell(self, x: Tensor, h: Tensor, layer: int) -> Tensor:
        """nn.GRU's cell written out (gates r, z, n in its weight order), so that it exports as plain matmuls."""
        gi = F.linear(x, getattr(self.gru, f"weight_ih_l{layer}"), getattr(self.gru, f"bias_ih_l{layer}"))
        gh = F.linear(h, getattr(self.gru, f"weight_hh_l{layer}"), getattr(self.gru, f"bias_hh_l{layer}"))
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    @torch.no_grad()
    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """D steps of the ``step`` graph carrying the hidden state (zeros at the start); step i draws the natural
        position ``positions[i]``.

        Noise order as ``training.autoregressive.AutoregressiveModel.sample``: per step i, ``noise.uniform(n)`` and, for
        continuous data, ``noise.normal(n)``.
        """
        x = torch.zeros(n, self.dim)
        h = torch.zeros(n, self.state_size)
        prev = torch.zeros(n, 1)
        for t, i in enumerate(self.positions):
            *params, h = self.step(prev, h, torch.full((n, 1), float(t)))
            x[:, i] = draw_position(self.spec, i, params, noise, temperature)
            prev = x[:, i:i + 1]
        return self.postprocess(self.unflat(x))

    @property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The step graph's state: the GRU units of every layer, then a row buffer (zeros at the start)."""
        return {"h": (self.state_size,)}
