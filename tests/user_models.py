"""Models this project did not write into its package, written the way a user would, for the own-model tests.

Nothing here imports genserve's model code: each class is a plain ``nn.Module`` that provides the methods of
its family contract (docs/contract.md), and genserve exports and serves it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def binary_digits_16(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits upsampled to 16x16 and binarised (2 levels): (train, test) of (N, 16, 16)."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    big = np.kron(images, np.ones((1, 2, 2))) >= 6
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(big))
    x = big[idx].astype(np.float32)
    return x[:1500], x[1500:]


class ConvVAE(nn.Module):
    """A convolutional VAE for H x W images with ``levels`` grey levels: a categorical decoder per pixel."""

    def __init__(self, size: int = 16, levels: int = 2, latent_dim: int = 8, channels: int = 16) -> None:
        super().__init__()
        self.size, self.levels, self.latent_dim = size, levels, latent_dim
        c = channels
        self.enc = nn.Sequential(nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(2 * c * (size // 4) ** 2, 2 * latent_dim))
        self.dec_in = nn.Linear(latent_dim, 2 * c * (size // 4) ** 2)
        self.dec = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(c, levels, 4, stride=2, padding=1))
        self.channels = c

    def encoder(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.enc(x.unsqueeze(1) / (self.levels - 1))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, 6 * torch.tanh(logvar / 6)

    def decoder(self, z: Tensor) -> Tensor:
        s = self.size // 4
        h = self.dec(self.dec_in(z).reshape(-1, 2 * self.channels, s, s))  # (B, levels, H, W)
        return h.permute(0, 2, 3, 1).reshape(z.shape[0], self.size * self.size, self.levels)

    def loss(self, x: Tensor) -> Tensor:
        """Negative ELBO, nats per image."""
        mu, logvar = self.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logp = torch.log_softmax(self.decoder(z), -1).gather(-1, x.reshape(len(x), -1, 1).long()).sum((1, 2))
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)
        return (kl - logp).mean()


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def split(self, t: Tensor) -> Tensor:  # (B, T, d) -> (B, heads, T, hd)
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.hd).transpose(1, 2)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = self.split(q) @ self.split(k).transpose(-1, -2) / math.sqrt(self.hd)
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        out = (att @ self.split(v)).transpose(1, 2).reshape(h.shape)
        return self.proj(out)


class TransformerAR(nn.Module):
    """A small causal Transformer over the D values of an example (discrete levels), GPT-style.

    Position i reads x_<i (a start token, then x_0 .. x_{i-1}). ``step`` runs one position with a key/value
    cache of shape (layers, 2, D, d) as its state, so sampling costs one token per step, not the prefix.
    """

    def __init__(self, dim: int, levels: int, d: int = 32, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.dim, self.levels, self.d, self.layers = dim, levels, d, layers
        self.tok = nn.Parameter(0.5 * torch.randn(levels + 1, d))  # the last row is the start token
        self.pos = nn.Parameter(0.5 * torch.randn(dim, d))
        self.blocks = nn.ModuleList(CausalSelfAttention(d, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(2 * layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                  for _ in range(layers))
        self.head = nn.Linear(d, levels)
        self.state_shapes = {"cache": (layers, 2, dim, d)}

    def conditionals(self, x: Tensor) -> Tensor:
        """logits (B, D, levels) of p(x_i | x_<i) for every position in one pass."""
        b = x.shape[0]
        flat = x.reshape(b, -1).long()
        prev = torch.cat([torch.full((b, 1), self.levels, dtype=torch.long), flat[:, :-1]], dim=1)
        h = self.tok[prev] + self.pos
        mask = torch.ones(self.dim, self.dim, dtype=torch.bool).tril()
        for i, block in enumerate(self.blocks):
            h = h + block(self.norms[2 * i](h), mask)
            h = h + self.mlps[i](self.norms[2 * i + 1](h))
        return self.head(h)

    def step(self, x_prev: Tensor, cache: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One position: x_prev (B, 1), cache (B, layers, 2, D, d), t (B, 1) -> (logits (B, levels), cache')."""
        b = x_prev.shape[0]
        at = (torch.arange(self.dim, dtype=t.dtype) == t).to(x_prev.dtype)  # (B, D) one-hot of position t
        token = torch.where(t == 0, torch.full_like(x_prev, float(self.levels)), x_prev)[:, 0].long()
        h = (self.tok[token] + at @ self.pos).unsqueeze(1)  # (B, 1, d)
        seen = (torch.arange(self.dim, dtype=t.dtype) <= t).reshape(b, 1, 1, self.dim)  # positions <= t
        caches = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(self.norms[2 * i](h)).chunk(3, dim=-1)
            keys = cache[:, i, 0] * (1 - at[..., None]) + at[..., None] * k  # write position t
            values = cache[:, i, 1] * (1 - at[..., None]) + at[..., None] * v
            caches.append(torch.stack([keys, values], dim=1))
            att = block.split(q) @ block.split(keys).transpose(-1, -2) / math.sqrt(block.hd)
            att = torch.softmax(att.masked_fill(~seen, float("-inf")), dim=-1)
            out = (att @ block.split(values)).transpose(1, 2).reshape(b, 1, self.d)
            h = h + block.proj(out)
            h = h + self.mlps[i](self.norms[2 * i + 1](h))
        return self.head(h[:, 0]), torch.stack(caches, dim=1)

    def loss(self, x: Tensor) -> Tensor:
        logits = self.conditionals(x)
        return F.cross_entropy(logits.reshape(-1, self.levels), x.reshape(-1).long()) * self.dim


def fit(model: nn.Module, x: np.ndarray, steps: int, lr: float = 3e-3, batch: int = 64, seed: int = 0) -> nn.Module:
    """A few Adam steps on minibatches of ``x``: enough to move the weights away from their initialisation."""
    torch.manual_seed(seed)
    data = torch.as_tensor(x)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        xb = data[torch.randint(0, len(data), (batch,))]
        loss = model.loss(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
