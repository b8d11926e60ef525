"""VAE served from its graphs: ``encoder`` (x -> mu, logvar), ``decoder`` (z -> logits | mean, std),
``log_weights`` (x, eps -> log p(x, z) - log q(z|x)) for the importance-weighted likelihood bound and, for a
learned prior (a VampPrior) only, ``prior`` (eps, u -> z) to draw z for Sample; without it z ~ N(0, I)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from genserve.core.families import FAMILIES
from genserve.core.noise import Noise, categorical_from_uniform
from genserve.server.programs.base import MOST_STEPS, Option, Program, Run, SampleResult


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class VAEProgram(Program):
    """The operations of ``genserve.training.vae.VAE``, drawing noise in the same order."""

    operations = FAMILIES["latent_variable"].operations
    options = (Option("importance_samples", "log_likelihood", int, 1, MOST_STEPS, "importance_samples",
                      "K of the importance-weighted bound (more: tighter and slower)"),
               Option("sample", "encode", bool, default=False, doc="draw z from q(z|x) instead of its mean"),
               Option("sample", "decode", bool, default=False, doc="draw x from p(x|z) instead of its mode"))

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, importance_samples: int | None = None,
                             **options: Any) -> np.ndarray:
        """log (1/K) sum_k w_k in nats per row, (N,): eps = noise.normal(K, N, q), scored K-chunk by K-chunk
        as rows k*N + n of the ``log_weights`` graph (chunks of consecutive k draw the same numbers as one)."""
        x = x.astype(np.float32)
        K = int(importance_samples or self.param("importance_samples"))
        q, N = int(self.param("latent_dim")), x.shape[0]
        chunk = max(1, int(self.param("iw_rows")) // N)
        logw = []
        for k0 in range(0, K, chunk):
            k = min(chunk, K - k0)
            eps = noise.normal(k, N, q).reshape(k * N, q)
            xs = np.broadcast_to(x, (k, *x.shape)).reshape(k * N, *x.shape[1:])
            logw.append((await run("log_weights", {"x": xs, "eps": eps}))["log_weight"].reshape(k, N))
        w = np.concatenate(logw).astype(np.float64)
        m = w.max(axis=0)
        return (m + np.log(np.exp(w - m).sum(axis=0)) - math.log(K)).astype(np.float32)

    async def log_likelihood_terms(self, run: Run, x: np.ndarray, noise: Noise, **options: Any
                                   ) -> tuple[np.ndarray, np.ndarray]:
        """(the bound log_likelihood serves (N,), -log p(x_i | z) (N, D) nats at z = the posterior mean).

        The terms explain the reconstruction term of the bound: where the decoder, given the code of x,
        finds x unlikely. They do not sum to -log p(x) (nor to the bound: the KL / prior terms of the code
        are not per dimension). Discrete data: -log softmax(logits)[x_i]; continuous: the Gaussian -log
        N(x_i | mean_i, std_i), raw units. The bound's own noise is drawn first, as without the terms.
        """
        lp = await self.log_likelihood(run, x, noise, **options)
        x = x.astype(np.float32)
        n = x.shape[0]
        z = (await run("encoder", {"x": x}))["mu"]
        out = await run("decoder", {"z": z})
        flat_x = x.reshape(n, -1).astype(np.float64)
        if self.spec.discrete:
            logits = out["logits"].astype(np.float64)
            logits = logits - logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            terms = -np.take_along_axis(logp, flat_x.astype(np.int64)[..., None], axis=-1)[..., 0]
        else:
            mean = out["mean"].reshape(n, -1).astype(np.float64)
            std = out["std"].reshape(n, -1).astype(np.float64)
            terms = 0.5 * math.log(2 * math.pi) + np.log(std) + 0.5 * ((flat_x - mean) / std) ** 2
        return lp, terms

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        """z = noise.normal(n, q) * temperature (with a ``prior`` graph that is its eps, and z = prior(eps, u) with
        u = noise.uniform(n, 1)); discrete: per-pixel inverse-CDF draws with u = noise.uniform(n, D); continuous:
        mean + std * noise.normal(n, D) * temperature."""
        z = noise.normal(n, int(self.param("latent_dim"))) * np.float32(temperature)
        if "prior" in self.graphs:
            z = (await run("prior", {"eps": z, "u": noise.uniform(n, 1)}))["z"]
        out = await run("decoder", {"z": z})
        if self.spec.discrete:
            u = noise.uniform(n, self.spec.dim)
            x = categorical_from_uniform(softmax(out["logits"]), u)
        else:
            eps = noise.normal(n, self.spec.dim) * np.float32(temperature)
            x = out["mean"] + out["std"] * eps
        return SampleResult(x.reshape(n, *self.spec.shape).astype(np.float32), z)

    async def encode(self, run: Run, x: np.ndarray, noise: Noise, sample: bool = False,
                     **options: Any) -> np.ndarray:
        """The posterior mean mu(x), (N, q); with ``sample`` a draw z = mu + exp(logvar / 2) * eps from
        q(z|x), eps = noise.normal(N, q)."""
        out = await run("encoder", {"x": x.astype(np.float32)})
        if not sample:
            return out["mu"]
        eps = noise.normal(*out["mu"].shape)
        return (out["mu"] + np.exp(0.5 * out["logvar"]) * eps).astype(np.float32)

    async def decode(self, run: Run, z: np.ndarray, noise: Noise, sample: bool = False,
                     **options: Any) -> np.ndarray:
        """Most likely level per pixel (discrete) or the decoder mean (continuous); with ``sample`` a draw
        from p(x|z), in the noise order of ``sample`` after its latents (u or eps of shape (N, D))."""
        n = z.shape[0]
        out = await run("decoder", {"z": z.astype(np.float32)})
        if self.spec.discrete:
            if sample:
                x = categorical_from_uniform(softmax(out["logits"]), noise.uniform(n, self.spec.dim))
            else:
                x = out["logits"].argmax(axis=-1).astype(np.float32)
        else:
            x = out["mean"] + out["std"] * noise.normal(n, self.spec.dim) if sample else out["mean"]
        return x.reshape(n, *self.spec.shape).astype(np.float32)
