"""Probabilistic PCA (Tipping & Bishop, 1999): maximum-likelihood closed form, exact Gaussian likelihood.

x = W z + mu + sigma * eps with z ~ N(0, I_q), eps ~ N(0, I_D), so p(x) = N(mu, W W^T + sigma^2 I).
Discrete data are modelled dequantised (y = x + u, u ~ U[0,1)^D): E_u[log p(x + u)] <= log P(x), a bound on
the probability of the integer example; scoring uses the tighter log (1/K) sum_k p(x + u_k) over K draws
(genserve.core.bounds). Continuous data are modelled after normalisation, and the density
is reported in raw units (Jacobian of the normalisation included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from genserve.core.bounds import LogMeanExp
from genserve.core.noise import Noise
from genserve.training.base import LOG2PI, Capabilities, GenerativeModel


class PPCA(GenerativeModel):
    """Probabilistic PCA with ``latent_dim`` components.

    Example:
        >>> from genserve.training.data import load_dataset
        >>> data = load_dataset("moons", seed=0)
        >>> m = PPCA(data.spec, latent_dim=1)
        >>> m.fit_closed_form(torch.as_tensor(data.train))
        >>> m.sample(3, Noise(0)).shape
        torch.Size([3, 2])
    """

    name = "ppca"
    family = "linear_gaussian"
    likelihood_kind = "exact"
    operations = ("sample", "log_likelihood", "encode", "decode")
    capabilities = Capabilities("prescribed", "stable", "approximate", "fast", "lossy", True)
    closed_form = True
    profiles = {"quick": {"arch": {"latent_dim": 16}}, "full": {"arch": {"latent_dim": 16}}}
    tabular_profiles = {"quick": {"arch": {"latent_dim": 1}}, "full": {"arch": {"latent_dim": 1}}}

    def __init__(self, spec, latent_dim: int = 16, dequant_draws: int = 16) -> None:
        super().__init__(spec, latent_dim=latent_dim, dequant_draws=dequant_draws)
        if not 1 <= latent_dim < spec.dim:
            raise ValueError(
                f"latent_dim must be in 1..{spec.dim - 1} for {spec.dim}-dimensional data, got {latent_dim}"
            )
        D, q = spec.dim, latent_dim
        self.latent_dim, self.dequant_draws = latent_dim, dequant_draws
        # For discrete data the estimate of E_u log p(x+u) is a lower bound; see likelihood_kind below.
        if spec.discrete:
            self.likelihood_kind = "lower_bound"
        self.register_buffer("W", torch.zeros(D, q))
        self.register_buffer("mu", torch.zeros(D))
        self.register_buffer("log_sigma2", torch.zeros(()))
        self.register_buffer("precision", torch.eye(D))  # (W W^T + sigma^2 I)^-1, cached for scoring
        self.register_buffer("logdet", torch.zeros(()))  # log|W W^T + sigma^2 I|
        self.register_buffer("post", torch.zeros(q, D))  # M^-1 W^T, posterior-mean map

    # ---- fitting ------------------------------------------------------------------------------------
    def _to_model_space(self, x: Tensor, u: Tensor | None) -> tuple[Tensor, float]:
        if self.spec.discrete:
            return self.flat(x) + (u if u is not None else 0.5), 0.0
        return self.normalise(x)

    @torch.no_grad()
    def fit_closed_form(self, x: Tensor) -> None:
        x = x.double()
        if self.spec.discrete:  # moments of x + u: mean + 1/2, covariance + I/12, exactly
            y = self.flat(x)
            mu, cov = y.mean(0) + 0.5, torch.cov(y.T, correction=0) + torch.eye(self.dim, dtype=x.dtype) / 12
        else:
            y, _ = self.normalise(x)
            mu, cov = y.mean(0), torch.cov(y.T, correction=0)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(1e-9), evecs.flip(1)
        q = self.latent_dim
        sigma2 = evals[q:].mean()
        W = evecs[:, :q] * torch.sqrt((evals[:q] - sigma2).clamp_min(0))
        C = W @ W.T + sigma2 * torch.eye(self.dim, dtype=x.dtype)
        M = W.T @ W + sigma2 * torch.eye(q, dtype=x.dtype)
        self.W.copy_(W.float())
        self.mu.copy_(mu.float())
        self.log_sigma2.copy_(torch.log(sigma2).float())
        self.precision.copy_(torch.linalg.inv(C).float())
        self.logdet.copy_(torch.linalg.slogdet(C)[1].float())
        self.post.copy_(torch.linalg.solve(M, W.T).float())

    def loss(self, x: Tensor) -> Tensor:
        return -self.log_prob(x, Noise(0)).mean()

    # ---- deterministic graphs -------------------------------------------------------------------
    def log_density(self, x: Tensor, u: Tensor | None = None) -> Tensor:
        """log p in nats of one dequantised draw (discrete: y = x + u) or of x itself (continuous)."""
        y, log_jac = self._to_model_space(x, u)
        d = y - self.mu
        maha = ((d @ self.precision) * d).sum(-1)
        return -0.5 * (self.dim * LOG2PI + self.logdet + maha) + log_jac

    def generate(self, z: Tensor, eps: Tensor) -> Tensor:
        """x = W z + mu + sigma eps in raw data units (continuous; discrete values before rounding)."""
        y = z @ self.W.T + self.mu + torch.exp(0.5 * self.log_sigma2) * eps
        if self.spec.discrete:
            return self.unflat(y - 0.5)  # centre of the dequantisation cell back to the level
        return self.denormalise(y)

    def posterior_mean(self, x: Tensor) -> Tensor:
        """E[z | x] = M^-1 W^T (y - mu); discrete x taken at the centre of its cell."""
        y, _ = self._to_model_space(x, None)
        return (y - self.mu) @ self.post.T

    # ---- operations -------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, noise: Noise, draws: int | None = None, **options: Any) -> Tensor:
        """Exact log-density (continuous); discrete: the log-mean-exp bound log (1/K) sum_k p(x + u_k) over
        K = ``draws`` uniform dequantisations (default ``dequant_draws``), a lower bound on log P(x) that
        tightens with K (genserve.core.bounds). Noise order: K times ``noise.uniform(B, D)``; draws are added
        one by one in float64 as the server adds them."""
        if not self.spec.discrete:
            return self.log_density(x)
        draws = int(draws or self.dequant_draws)
        bound = LogMeanExp(x.shape[0])
        for _ in range(draws):
            u = torch.from_numpy(noise.uniform(x.shape[0], self.dim))
            bound.add(self.log_density(x, u).detach().double().numpy())
        return torch.from_numpy(bound.value()).float()

    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """Noise order: z = noise.normal(n, q), eps = noise.normal(n, D); both scaled by temperature."""
        z = torch.from_numpy(noise.normal(n, self.latent_dim)) * temperature
        eps = torch.from_numpy(noise.normal(n, self.dim)) * temperature
        return self.postprocess(self.generate(z, eps))

    def encode(self, x: Tensor, noise: Noise | None = None) -> Tensor:
        return self.posterior_mean(x)

    def decode(self, z: Tensor, noise: Noise | None = None) -> Tensor:
        return self.postprocess(self.generate(z, torch.zeros(z.shape[0], self.dim)))

    def program_parameters(self) -> dict[str, float]:
        return {"dequant_draws": self.dequant_draws}


