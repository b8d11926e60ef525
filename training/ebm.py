"""Energy-based model: p(x) proportional to exp(-E(x)), trained by contrastive divergence with short-run Langevin.

E is an MLP with SiLU activations (smooth, so Langevin's dE/dx is continuous). Training (Du & Mordatch, 2019):
negatives come from K Langevin steps started from a replay buffer (a fraction ``reinit`` of chains restarted
from fresh noise), and the loss is E(x_data) - E(x_model) + alpha (E(x_data)^2 + E(x_model)^2), the last term
keeping energies near zero so they cannot drift.

Serving samples from fresh noise (no buffer travels with the model), so the chains training sees must include
short chains from noise. With Du & Mordatch's 5% restarts the buffer's chains became good digits (raw-pixel
Frechet distance 105 to the test split) while 100-step chains from noise stayed blobs (320) and long ones
collapsed onto a few saturated shapes (1260 at 800 steps). Restarting 80% of the chains (the profiles'
``reinit``) trains the K-step sampler from noise (non-persistent short-run MCMC, Nijkamp et al., 2019) while
the surviving 20% keep a little longer chains near the data: 60 steps from noise then gave 124, better than
all-fresh chains (136 at 40 steps), measured after 4000 steps of batch 64.

Model space y: digits are dequantised and scaled, y = (x + u) / levels in [0, 1); continuous rows are
normalised, y = (x - mean) / std. One Langevin step in y-space, with step size eta, noise scale tau and
temperature T, is

    y <- clip(y - eta * dE/dy + sqrt(2 eta) * tau * T * eps, box),    eps ~ N(0, I)

(tau = T = 1 is exact Langevin dynamics; short-run EBMs train with a small tau). Sampling runs the same step in
raw data units x = a y + b (a = levels, b = -1/2 for digits; a = std, b = mean for rows), where it reads
x <- clip(x - eta a^2 dE/dx + a sqrt(2 eta) tau T eps), so that the serving program reproduces it over the
``energy_grad`` graph with the same float32 arithmetic. dE/dx comes from a hand-written backward pass through
the MLP (torch.autograd does not export to ONNX).

Energies are reported in raw units: E(x) = E_net(y) + log|dy/dx|^-1 summed over features (D log levels, or
sum log std), so log_prob(x) = -E(x) is an unnormalised log-density of x; for integer images it is taken at the
centre of the cell, y = (x + 1/2) / levels, i.e. an unnormalised log-probability of the integer image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.core.langevin import langevin_constants
from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.base import Capabilities, GenerativeModel
from genserve.training.gan import sample_distance


def langevin(grad_fn: Callable[[Tensor], Tensor], x: Tensor, steps: int, c: dict[str, Tensor],
             noise: Noise) -> Tensor:
    """``steps`` Langevin steps in raw units from x (n, D); noise order: per step ``noise.normal(n, D)``.

    ``grad_fn(x) -> dE/dx`` (n, D); ``c`` holds the tensors of ``langevin_constants``. The float32 operations
    are the ones ``server.programs.energy`` repeats in numpy, in the same order.
    """
    n, D = x.shape
    for _ in range(steps):
        g = grad_fn(x)
        eps = torch.from_numpy(noise.normal(n, D))
        x = x - c["drift"] * g + c["diffusion"] * eps
        x = torch.minimum(torch.maximum(x, c["low"]), c["high"])
    return x


class EnergyModel(GenerativeModel):
    """An MLP energy E(x) trained by contrastive divergence; samples by Langevin dynamics.

    Arguments:
        hidden, depth: width and number of SiLU hidden layers of the energy network.
        train_steps: Langevin steps per training batch (K); sample_steps: default steps when sampling.
        step_size, noise_scale: eta and tau of the Langevin step (module docstring), in model-space units.
        alpha: weight of the energy-magnitude regulariser.
        buffer_size, reinit: replay buffer of chains and the fraction restarted from noise per batch.
        box: continuous rows are clipped to +-box standard deviations during Langevin (images to their range).
        val_samples: samples drawn for the validation criterion.

    Example:
        >>> from genserve.training.data import load_dataset
        >>> m = EnergyModel(load_dataset("moons").spec, hidden=16, sample_steps=5)
        >>> m.sample(3, Noise(0)).shape
        torch.Size([3, 2])
    """

    name = "ebm"
    family = "energy"
    likelihood_kind = "unnormalized"
    operations = ("sample", "log_likelihood")
    capabilities = Capabilities("energy-based", "stable", "unnormalized", "slow", "rather not", True)
    profiles = {
        "quick": {"epochs": 60, "batch_size": 64, "lr": 3e-4, "patience": 20,
                  "arch": {"hidden": 256, "depth": 2, "train_steps": 20, "sample_steps": 40, "reinit": 0.8}},
        "full": {"epochs": 400, "batch_size": 64, "lr": 1e-4, "patience": 100, "max_minutes": 9.0,
                 "arch": {"hidden": 256, "depth": 2, "train_steps": 40, "sample_steps": 60, "reinit": 0.8}},
    }
    tabular_profiles = {
        "quick": {"epochs": 60, "batch_size": 128, "lr": 1e-3, "patience": 20,
                  "arch": {"hidden": 128, "depth": 2, "train_steps": 40, "sample_steps": 60, "reinit": 0.8}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 3e-4, "patience": 60,
                 "arch": {"hidden": 256, "depth": 3, "train_steps": 40, "sample_steps": 60, "reinit": 0.8}},
    }

    def __init__(self, spec: DataSpec, hidden: int = 256, depth: int = 2, train_steps: int = 40,
                 sample_steps: int = 60, step_size: float = 1.0, noise_scale: float = 0.01, alpha: float = 0.1,
                 buffer_size: int = 10000, reinit: float = 0.8, box: float = 4.0, val_samples: int = 500) -> None:
        super().__init__(spec, hidden=hidden, depth=depth, train_steps=train_steps, sample_steps=sample_steps,
                         step_size=step_size, noise_scale=noise_scale, alpha=alpha, buffer_size=buffer_size,
                         reinit=reinit, box=box, val_samples=val_samples)
        if hidden < 1 or depth < 1 or train_steps < 1 or sample_steps < 0 or buffer_size < 1:
            raise ValueError(f"hidden, depth, train_steps, buffer_size must be >= 1 and sample_steps >= 0, got "
                             f"{hidden}, {depth}, {train_steps}, {buffer_size}, {sample_steps}")
        if step_size <= 0 or noise_scale < 0 or alpha < 0 or not 0 <= reinit <= 1 or box <= 0:
            raise ValueError(f"need step_size > 0, noise_scale >= 0, alpha >= 0, 0 <= reinit <= 1, box > 0; got "
                             f"{step_size}, {noise_scale}, {alpha}, {reinit}, {box}")
        D = spec.dim
        self.train_steps, self.sample_steps = train_steps, sample_steps
        self.step_size, self.noise_scale, self.alpha, self.box = step_size, noise_scale, alpha, box
        self.buffer_size, self.reinit, self.val_samples = buffer_size, reinit, val_samples
        sizes = [D] + [hidden] * depth
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.out = nn.Linear(hidden, 1)
        c = langevin_constants(spec, step_size, noise_scale, 1.0, box)
        self.register_buffer("scale", torch.from_numpy(c["a"]), persistent=False)  # x = scale * y + shift
        self.register_buffer("shift", torch.from_numpy(c["b"]), persistent=False)
        # -log|dy/dx| summed over features: energies in raw units (see the module docstring)
        self.log_volume = float(np.log(c["a"].astype(np.float64)).sum())
        # The replay buffer of persistent chains (model space): saved with the weights so that a resumed run
        # continues the same chains. Drawn last, so the weights' initialisation does not depend on its size.
        self.register_buffer("replay", self._fresh(buffer_size))
        self._last: dict[str, float] = {}

    # ---- the energy and its gradient ----------------------------------------------------------------
    def energy_y(self, y: Tensor) -> Tensor:
        """E_net(y) in model space, (B, D) -> (B,)."""
        h = y
        for lin in self.hidden_layers:
            h = F.silu(lin(h))
        return self.out(h).squeeze(-1)

    def energy_grad_y(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(E_net(y), dE_net/dy) with a hand-written backward pass: (B,), (B, D). No autograd, so it exports."""
        pre = []
        h = y
        for lin in self.hidden_layers:
            a = lin(h)
            pre.append(a)
            h = F.silu(a)
        e = self.out(h).squeeze(-1)
        g = self.out.weight  # (1, H): dE/dh of the last hidden layer, broadcast over the batch below
        for lin, a in zip(reversed(self.hidden_layers), reversed(pre), strict=True):
            s = torch.sigmoid(a)
            g = (g * (s * (1 + a * (1 - s)))) @ lin.weight  # silu'(a) = s (1 + a (1 - s)); then through W
        return e, g

    def _y(self, x: Tensor) -> Tensor:
        return (self.flat(x) - self.shift) / self.scale

    def energy(self, x: Tensor) -> Tensor:
        """E(x) in raw units (B, *shape) -> (B,): the ``energy`` graph; -E(x) is the unnormalised log-density."""
        return self.energy_y(self._y(x)) + self.log_volume

    def energy_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(E(x), dE/dx): (B,), (B, *shape), raw units; the ``energy_grad`` graph Langevin sampling calls."""
        e, g = self.energy_grad_y(self._y(x))
        return e + self.log_volume, self.unflat(g / self.scale)

    # ---- training -----------------------------------------------------------------------------------
    def _fresh(self, n: int) -> Tensor:
        """Fresh chain starts in model space: uniform on [0, 1) for levels, standard normal for rows."""
        return torch.rand(n, self.dim) if self.spec.discrete else torch.randn(n, self.dim)

    @torch.no_grad()
    def _train_langevin(self, y: Tensor) -> Tensor:
        sigma = math.sqrt(2 * self.step_size) * self.noise_scale
        low, high = (0.0, 1.0) if self.spec.discrete else (-self.box, self.box)
        for _ in range(self.train_steps):
            _, g = self.energy_grad_y(y)
            y = (y - self.step_size * g + sigma * torch.randn_like(y)).clamp(low, high)
        return y

    def forward(self, x: Tensor) -> Tensor:
        """The contrastive-divergence loss of one batch (draws negatives and updates the replay buffer)."""
        B = x.shape[0]
        if self.spec.discrete:
            y_data = (self.flat(x) + torch.rand(B, self.dim)) / self.spec.levels
        else:
            y_data = self._y(x)
        idx = torch.randint(0, self.buffer_size, (B,))
        restart = torch.rand(B) < self.reinit
        y0 = torch.where(restart[:, None], self._fresh(B), self.replay[idx])
        y_model = self._train_langevin(y0)
        self.replay[idx] = y_model
        e_data, e_model = self.energy_y(y_data), self.energy_y(y_model)
        self._last = {"e_data": float(e_data.detach().mean()), "e_model": float(e_model.detach().mean())}
        return e_data.mean() - e_model.mean() + self.alpha * (e_data**2 + e_model**2).mean()

    def loss(self, x: Tensor) -> Tensor:
        return self(x)

    def training_step(self, x: Tensor, optimizers: list[torch.optim.Optimizer], grad_clip: float) -> dict[str, float]:
        (opt,) = optimizers
        opt.zero_grad(set_to_none=True)
        loss = self(x)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        opt.step()
        return {"loss": float(loss.detach()), **self._last}

    @torch.no_grad()
    def validation_loss(self, x: Tensor) -> float:
        """Distance between ``val_samples`` Langevin samples (seed 0) and the validation rows, lower is better:
        Frechet distance of raw pixels, energy distance of normalised rows (``training.gan.sample_distance``).
        The CD loss hovers near zero whatever the model's quality, so it cannot drive early stopping."""
        return sample_distance(self, x, self.sample(self.val_samples, Noise(0)))

    # ---- operations ---------------------------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, x: Tensor, noise: Noise | None = None, **options: Any) -> Tensor:
        """-E(x) in nats, (B,): unnormalised (log Z unknown); integer images scored at the cell centres."""
        return -self.energy(x)

    @torch.no_grad()
    def sample(self, n: int, noise: Noise, temperature: float = 1.0, langevin_steps: int | None = None,
               langevin_step_size: float | None = None, langevin_noise: float | None = None,
               **options: Any) -> Tensor:
        """Langevin dynamics from noise. Noise order: init = noise.uniform(n, D) for levels (y in [0, 1)) or
        noise.normal(n, D) for rows, then ``langevin_steps`` times noise.normal(n, D); temperature scales the
        Langevin noise. Defaults: ``sample_steps``, ``step_size``, ``noise_scale``."""
        steps = self.sample_steps if langevin_steps is None else int(langevin_steps)
        c = {k: torch.from_numpy(v) for k, v in langevin_constants(
            self.spec, self.step_size if langevin_step_size is None else float(langevin_step_size),
            self.noise_scale if langevin_noise is None else float(langevin_noise), float(temperature),
            self.box).items()}
        init = torch.from_numpy(noise.uniform(n, self.dim) if self.spec.discrete else noise.normal(n, self.dim))
        x = init * c["a"] + c["b"]
        x = langevin(lambda v: self.flat(self.energy_grad(self.unflat(v))[1]), x, steps, c, noise)
        return self.postprocess(self.unflat(x))

    def program_parameters(self) -> dict[str, float]:
        return {"langevin_steps": self.sample_steps, "langevin_step_size": self.step_size,
                "langevin_noise": self.noise_scale, "box": self.box}
