"""The family contracts: what a PyTorch module provides for each family, and the graphs export makes of it.

Every model genserve serves, the built-in seven and a user's own, passes through one door: ``bind(module,
family, spec)`` checks the module against its family's contract and returns a ``Bound`` model (graphs,
program parameters, operations) that ``export.repository.export_model`` writes. Nothing here runs in the
server: the server runs the graphs with the family's program (``genserve.server.programs``).

Conventions for every family (the same as the built-ins'):

  * ``x`` is a float32 batch (B, *spec.shape) in raw data units: integer levels 0..levels-1 for discrete
    data, raw values for continuous data (the module normalises inside, Jacobian included, so densities are
    in nats of raw data).
  * Log-densities are nats per example, shape (B,).
  * Graphs are deterministic: noise (z, eps, u) is an input the server draws from the request's seed.

The contract of each family, method by method, is in ``FAMILIES`` and in docs/contract.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from genserve.core.families import FAMILIES as INFO
from genserve.core.families import Capabilities, FamilyInfo
from genserve.core.orders import order_name, order_positions
from genserve.core.spec import DataSpec
from genserve.training.base import GraphDef, Lambda

B = 4  # example batch for tracing; export checks batch sizes 1, 7 and 64 afterwards
LOG2PI = math.log(2 * math.pi)


class ContractError(ValueError):
    """A module that does not meet its family's contract; the message names the method and what is wrong."""


@dataclass(frozen=True)
class Method:
    """One method (or attribute) a module provides: its call, what it returns, and whether it is required."""

    name: str
    call: str
    returns: str
    required: bool = True
    attribute: bool = False


@dataclass(frozen=True)
class Family:
    """A family's contract: the shared family row (core.families) plus the methods a module provides."""

    info: FamilyInfo
    methods: tuple[Method, ...]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def summary(self) -> str:
        return self.info.summary

    @property
    def operations(self) -> tuple[str, ...]:
        return self.info.operations

    @property
    def likelihood_kind(self) -> str:
        return self.info.likelihood_kind

    @property
    def capabilities(self) -> Capabilities:
        return self.info.capabilities

    @property
    def parameters(self) -> dict[str, float]:
        return dict(self.info.parameters)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(INFO["autoregressive"],
           (Method("conditionals", "conditionals(x)",
                "discrete: logits (B, D, levels) of p(x_i | x_<i); continuous: (logits, means, log_scales), each "
                "(B, D, K), a K-component Gaussian mixture per position in normalised units (x - mean) / std"),
         Method("step", "step(x_prev, *state, t)",
                "optional one-step graph for sampling without re-reading the prefix: x_prev (B, 1) value of "
                "position t-1 (ignored at t = 0), t (B, 1) the position as a float, state tensors as named in "
                "state_shapes (zeros at t = 0) -> (*conditional parameters of position t, each (B, P), "
                "*next state)", required=False),
         Method("state_shapes", "state_shapes: dict[str, tuple[int, ...]]",
                "with step: name -> shape without the batch axis of each state tensor (an RNN's hidden state, a "
                "Transformer's key/value cache)", required=False, attribute=True))),
    Family(INFO["flow"],
           (Method("transform", "transform(x) or, for discrete data, transform(x, u)",
                "(z, log_prob): z = f(x) (B, D) and log p(x) (B,) in nats; for discrete data u (B, D) in [0, 1) "
                "dequantises, y = x + u, and log_prob is the density of y (a bound on log P(x) on average)"),
         Method("inverse", "inverse(z)",
                "x = f^-1(z), (B, *shape) or (B, D); discrete data: the dequantised value y (the server reports "
                "its integer cell)", required=False),
         Method("inverse_pass", "inverse_pass(y, x) or inverse_pass(y, x, stage)",
                "instead of inverse, for flows whose inverse is a fixed-point loop (MAF): one pass x -> x_next "
                "towards f_stage^-1(y), starting from x = 0; the server runs inverse_passes[stage] passes per stage, "
                "stage 0 first, feeding each stage's result to the next as y", required=False),
         Method("inverse_passes", "inverse_passes: int | list[int]",
                "with inverse_pass: passes per stage (a list for several stages)", required=False, attribute=True))),
    Family(INFO["latent_variable"],
           (Method("encoder", "encoder(x)", "(mu, logvar) of q(z|x) = N(mu, exp(logvar)), each (B, latent_dim)"),
         Method("decoder", "decoder(z)",
                "p(x|z): discrete logits (B, D, levels); continuous (mean, std), each (B, D), raw units"),
         Method("latent_dim", "latent_dim: int", "size of z", attribute=True),
         Method("log_weights", "log_weights(x, eps)",
                "optional: log p(x, z) - log q(z|x) for z = mu + exp(logvar / 2) * eps, (B,); built from encoder "
                "and decoder when absent", required=False),
         Method("log_prior", "log_prior(z)",
                "optional: log p(z) (B,) of a learned prior (a VampPrior, a mixture); N(z; 0, I) when absent",
                required=False),
         Method("prior", "prior(eps, u)",
                "optional, with log_prior: a draw z (B, latent_dim) from p(z), given eps (B, latent_dim) standard "
                "normal (times the temperature) and u (B, 1) uniform in [0, 1) (e.g. to pick a mixture component); "
                "the server samples z through it, z = eps when absent", required=False))),
    Family(INFO["linear_gaussian"],
           (Method("log_density", "log_density(x) or, for discrete data, log_density(x, u)",
                "log p(x) (B,) in nats; for discrete data of the dequantised y = x + u"),
         Method("posterior_mean", "posterior_mean(x)", "E[z | x], (B, latent_dim)"),
         Method("generate", "generate(z, eps)", "W z + mu + sigma eps in raw units, (B, *shape) or (B, D)"),
         Method("latent_dim", "latent_dim: int", "size of z", attribute=True))),
    Family(INFO["implicit"],
           (Method("generate", "generate(z)", "x = G(z) in raw units before rounding, (B, *shape) or (B, D)"),
         Method("latent_dim", "latent_dim: int", "size of z", attribute=True))),
    Family(INFO["energy"],
           (Method("energy", "energy(x)", "E(x), (B,), nats up to the unknown log Z"),
         Method("energy_grad", "energy_grad(x)",
                "(E(x), dE/dx) of shapes (B,) and (B, *shape), without autograd (torch.onnx cannot export "
                "autograd inside a graph: write the backward pass by hand, as training/ebm.py does)"))),
)}


@dataclass
class Bound:
    """A module bound to its family's contract: what export writes and the server program runs."""

    module: nn.Module
    family: Family
    spec: DataSpec
    name: str
    graphs: dict[str, GraphDef]
    parameters: dict[str, float]
    operations: tuple[str, ...]
    likelihood_kind: str
    capabilities: Capabilities
    arch: dict[str, Any] = field(default_factory=dict)

    def program_parameters(self) -> dict[str, float]:
        return dict(self.parameters)


def family(name: str) -> Family:
    """The contract of a family; ContractError listing the families for an unknown name."""
    if name not in FAMILIES:
        raise ContractError(f"unknown family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def bind(module: nn.Module, family_name: str, spec: DataSpec, name: str | None = None,
         rows: np.ndarray | None = None) -> Bound:
    """Check ``module`` against the ``family_name`` contract for data ``spec`` and return its graphs.

    ``rows`` (N, *spec.shape) are real examples for the behavioural checks (random valid data otherwise).
    Raises ContractError naming what is wrong: a missing method, an output of the wrong shape, a flow whose
    inverse does not invert its forward or whose log-determinant disagrees with autograd, an autoregressive
    conditional that sees positions >= i, randomness inside a graph, a spec that does not fit the module.
    """
    fam = family(family_name)
    if not isinstance(module, nn.Module):
        raise ContractError(f"expected a torch.nn.Module, got {type(module).__name__}")
    cls = type(module).__name__
    missing = [m for m in fam.methods if m.required and not _has(module, m)]
    if missing:
        m = missing[0]
        raise ContractError(f"{cls} does not provide {m.call}, which the {fam.name} contract requires: {m.returns}")
    module.eval()
    x = _rows(spec, rows)
    with torch.no_grad():
        graphs = _BUILDERS[fam.name](module, spec, x)
    params = dict(fam.parameters)
    params.update(_extra_parameters(module, spec, fam, graphs))
    own = getattr(module, "program_parameters", None)
    if callable(own):
        params.update({k: float(v) for k, v in own().items()})
    _check_deterministic(cls, graphs)  # first: the checks below compare calls
    _CHECKS[fam.name](module, spec, x, graphs)
    ops = tuple(getattr(module, "operations", fam.operations))
    kind = getattr(module, "likelihood_kind", None) or _default_kind(fam, spec)
    return Bound(module, fam, spec, name or getattr(module, "name", None) or cls.lower(), graphs, params, ops,
                 kind, getattr(module, "capabilities", fam.capabilities), dict(getattr(module, "arch", {}) or {}))


def _has(module: nn.Module, m: Method) -> bool:
    value = getattr(module, m.name, None)
    return value is not None if m.attribute else callable(value)


def _default_kind(fam: Family, spec: DataSpec) -> str:
    if fam.name in ("flow", "linear_gaussian") and spec.discrete:
        return "lower_bound"  # E_u log p(x + u) <= log P(x)
    return fam.likelihood_kind


def _rows(spec: DataSpec, rows: np.ndarray | None, n: int = B, seed: int = 0) -> Tensor:
    """``n`` valid examples (B, *shape): real rows where given, else random levels or normalised draws."""
    if rows is not None and len(rows) >= n:
        return torch.from_numpy(np.asarray(rows[:n], dtype=np.float32).reshape(n, *spec.shape))
    return example_data(spec, n, seed)


def example_data(spec: DataSpec, n: int, seed: int = 0) -> Tensor:
    """Random valid examples (n, *spec.shape): integer levels, or mean + std * N(0, 1) per feature."""
    g = torch.Generator().manual_seed(seed)
    if spec.discrete:
        return torch.randint(0, spec.levels, (n, *spec.shape), generator=g).float()
    mean = torch.tensor(spec.mean or [0.0] * spec.dim)
    std = torch.tensor(spec.std or [1.0] * spec.dim)
    return (mean + std * torch.randn(n, spec.dim, generator=g)).reshape(n, *spec.shape)


def _call(cls: str, what: str, fn: Callable[..., Any], *args: Tensor) -> tuple[Tensor, ...]:
    """Call a contract method; ContractError with the shapes fed when it fails (a spec that does not fit)."""
    try:
        out = fn(*args)
    except Exception as e:  # any failure of user code: name the call and the shapes
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise ContractError(f"{cls}.{what} failed on inputs of shapes {shapes} made from the data spec: "
                            f"{type(e).__name__}: {str(e)[:300]}; does the spec match the module's inputs?") from None
    out = out if isinstance(out, tuple | list) else (out,)
    if not all(isinstance(t, Tensor) for t in out):
        raise ContractError(f"{cls}.{what} returned {[type(t).__name__ for t in out]}; expected tensors")
    return tuple(out)


def _expect(cls: str, what: str, got: Tensor, *shapes: tuple[int, ...]) -> None:
    if tuple(got.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ContractError(f"{cls}.{what} has shape {tuple(got.shape)}; the contract needs {want}")


def _count(cls: str, what: str, out: tuple[Tensor, ...], n: int, names: str) -> None:
    if len(out) != n:
        raise ContractError(f"{cls}.{what} returned {len(out)} tensors; the contract needs {n}: {names}")


def _data_shapes(spec: DataSpec, b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (b, *spec.shape), (b, spec.dim)


# ---- autoregressive ----------------------------------------------------------------------------------
def _ar_outputs(spec: DataSpec) -> list[str]:
    return ["logits"] if spec.discrete else ["logits", "means", "log_scales"]


def _build_ar(m: nn.Module, spec: DataSpec, x: Tensor) -> dict[str, GraphDef]:
    graphs = {"logits": GraphDef(Lambda(m, m.conditionals), {"x": x}, _ar_outputs(spec))}
    if callable(getattr(m, "step", None)):
        states = _state_shapes(m)
        n = x.shape[0]
        g = torch.Generator().manual_seed(1)
        inputs = {"x_prev": x.reshape(n, -1)[:, :1].clone()}
        inputs.update({s: torch.randn(n, *shape, generator=g) for s, shape in states.items()})
        inputs["t"] = torch.tensor([[float(min(i, spec.dim - 1))] for i in (0, 1, 2, spec.dim - 1)][:n] +
                                   [[0.0]] * max(0, n - 4))
        outputs = _ar_outputs(spec) + [f"{s}_next" for s in states]
        graphs["step"] = GraphDef(Lambda(m, m.step), inputs, outputs)
    return graphs


def _state_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    cls = type(m).__name__
    states = getattr(m, "state_shapes", None)
    if not isinstance(states, dict) or not states:
        raise ContractError(f"{cls} has step() but no state_shapes; declare state_shapes = {{'h': (size,)}}: the "
                            "name and shape (without the batch axis) of each state tensor step() takes and returns")
    bad = [s for s in states if not s.isidentifier() or s in ("x_prev", "t")]
    if bad:
        raise ContractError(f"{cls}.state_shapes names {bad} are not usable graph input names")
    return {s: tuple(int(d) for d in shape) for s, shape in states.items()}


def _check_ar(m: nn.Module, spec: DataSpec, x: Tensor, graphs: dict[str, GraphDef]) -> None:
    cls, D, n = type(m).__name__, spec.dim, x.shape[0]
    with torch.no_grad():
        out = _call(cls, "conditionals(x)", m.conditionals, x)
    if spec.discrete:
        _count(cls, "conditionals(x)", out, 1, "logits (B, D, levels)")
        _expect(cls, "conditionals(x)", out[0], (n, D, spec.levels))
    else:
        _count(cls, "conditionals(x)", out, 3, "logits, means, log_scales, each (B, D, K)")
        k = out[0].shape[-1] if out[0].dim() == 3 else 0
        for name, t in zip(("logits", "means", "log_scales"), out, strict=True):
            _expect(cls, f"conditionals(x) {name}", t, (n, D, max(k, 1)))
    order = _ar_order(m, spec)
    _check_causal(m, spec, x, out, order)
    if "step" in graphs:
        _check_step(m, spec, x, out, _state_shapes(m), order)


def _ar_order(m: nn.Module, spec: DataSpec) -> np.ndarray:
    """The natural flat position of each step of the module's order (``core.orders``): the one its program
    parameters record (``order``), raster when they record none."""
    own = getattr(m, "program_parameters", None)
    params = own() if callable(own) else {}
    try:
        return order_positions(spec.shape, order_name(params))
    except ValueError as e:
        raise ContractError(f"{type(m).__name__}.program_parameters(): {e}") from None


def _check_causal(m: nn.Module, spec: DataSpec, x: Tensor, out: tuple[Tensor, ...], order: np.ndarray) -> None:
    """The perturbation check: changing the steps >= i of the model's order must leave the conditionals of steps
    <= i alone (the conditionals are compared in step order)."""
    cls, D, n = type(m).__name__, spec.dim, x.shape[0]
    positions = sorted({0, D - 1, *np.linspace(0, D - 1, num=min(D, 12)).round().astype(int).tolist()})
    g = torch.Generator().manual_seed(2)
    idx = torch.from_numpy(order)
    flat = x.reshape(n, D)[:, idx]  # step order
    out = tuple(a[:, idx] for a in out)
    for i in positions:
        other = example_data(spec, n, seed=100 + i).reshape(n, D)
        if spec.discrete:  # a different level everywhere
            other = torch.remainder(flat + 1 + torch.randint(0, spec.levels - 1, flat.shape, generator=g),
                                    spec.levels)
        else:
            other = other + 1.0
        x2 = flat.clone()
        x2[:, i:] = other[:, i:]
        natural = torch.empty_like(x2)
        natural[:, idx] = x2
        with torch.no_grad():
            out2 = m.conditionals(natural.reshape(x.shape))
        out2 = tuple(b[:, idx] for b in (out2 if isinstance(out2, tuple | list) else (out2,)))
        for a, b in zip(out, out2, strict=True):
            diff = (a[:, : i + 1] - b[:, : i + 1]).abs().reshape(n, i + 1, -1).amax(dim=(0, 2))
            tol = 1e-5 * (1 + a[:, : i + 1].abs().max())
            bad = torch.nonzero(diff > tol)
            if len(bad):
                j = int(bad[0])
                raster = bool((order == np.arange(D)).all())
                step = "" if raster else f" (step {j} of its order)"
                raise ContractError(
                    f"{cls}.conditionals is not autoregressive: the conditional at position {order[j]}{step} changes "
                    f"(by {float(diff[j]):.3g}) when input positions >= {i} change, so p(x_{j} | x_<{j}) sees "
                    f"x_{i}..; mask the inputs so that position j sees only positions < j (row-major order of "
                    f"{spec.shape}{'' if raster else ', permuted by the order program_parameters() names'})")


def _check_step(m: nn.Module, spec: DataSpec, x: Tensor, out: tuple[Tensor, ...],
                states: dict[str, tuple[int, ...]], order: np.ndarray) -> None:
    """step() teacher-forced along x in the model's order must give the same conditionals as one conditionals(x)
    pass: step t those of the natural position order[t]."""
    cls, D, n = type(m).__name__, spec.dim, x.shape[0]
    flat = x.reshape(n, D)
    state = [torch.zeros(n, *shape) for shape in states.values()]
    prev = torch.zeros(n, 1)
    k = len(out)
    with torch.no_grad():
        for t in range(D):
            res = _call(cls, "step(x_prev, *state, t)", m.step, prev, *state, torch.full((n, 1), float(t)))
            _count(cls, "step(x_prev, *state, t)", res, k + len(states),
                   f"{k} conditional parameter tensors, then {len(states)} state tensors {list(states)}")
            for name, got, shape in zip(states, res[k:], states.values(), strict=True):
                _expect(cls, f"step() next state {name!r}", got, (n, *shape))
            pos = int(order[t])
            for got, want in zip(res[:k], out, strict=True):
                w = want[:, pos]
                err = float((got.reshape(w.shape) - w).abs().max()) if got.numel() == w.numel() else math.inf
                if not err <= 1e-4 * (1 + float(w.abs().max())):
                    at = f"position {t}" if pos == t else f"step {t} (position {pos})"
                    raise ContractError(f"{cls}.step at {at} disagrees with conditionals(x)[:, {pos}] "
                                        f"(max diff {err:.3g}, shapes {tuple(got.shape)} vs {tuple(w.shape)}); "
                                        "step must give p(x_t | x_<t) from the carried state")
            state = list(res[k:])
            prev = flat[:, pos:pos + 1]


# ---- flow ------------------------------------------------------------------------------------------
def _passes(m: nn.Module) -> list[int]:
    cls = type(m).__name__
    p = getattr(m, "inverse_passes", None)
    if p is None:
        raise ContractError(f"{cls} has inverse_pass() but no inverse_passes; declare how many passes invert it "
                            "(the number of features for a MAF transform)")
    passes = [int(p)] if isinstance(p, int | np.integer) else [int(v) for v in p]
    if not passes or min(passes) < 1:
        raise ContractError(f"{cls}.inverse_passes must be >= 1 per stage, got {p}")
    return passes


def _build_flow(m: nn.Module, spec: DataSpec, x: Tensor) -> dict[str, GraphDef]:
    cls, n, D = type(m).__name__, x.shape[0], spec.dim
    g = torch.Generator().manual_seed(3)
    inputs = {"x": x, "u": torch.rand(n, D, generator=g)} if spec.discrete else {"x": x}
    graphs = {"forward": GraphDef(Lambda(m, m.transform), inputs, ["z", "log_prob"])}
    z = torch.randn(n, D, generator=g)
    if callable(getattr(m, "inverse", None)):
        graphs["inverse"] = GraphDef(Lambda(m, m.inverse), {"z": z}, ["x"])
    elif callable(getattr(m, "inverse_pass", None)):
        passes = _passes(m)
        for k in range(len(passes)):
            fn = m.inverse_pass if len(passes) == 1 else _Stage(m, k)
            graphs[f"inverse_pass_{k}"] = GraphDef(Lambda(m, fn), {"y": z, "x": z.clone()}, ["x_next"])
    else:
        raise ContractError(f"{cls} provides neither inverse(z) nor inverse_pass(y, x) with inverse_passes; the "
                            "flow contract needs one of them to sample and decode")
    return graphs


class _Stage:
    """``inverse_pass(y, x, stage)`` with the stage fixed, as its own graph."""

    def __init__(self, m: nn.Module, stage: int) -> None:
        self.m, self.stage = m, stage

    def __call__(self, y: Tensor, x: Tensor) -> Tensor:
        return self.m.inverse_pass(y, x, self.stage)


def flow_inverse(m: nn.Module, z: Tensor) -> Tensor:
    """f^-1(z) the way the server computes it: ``inverse``, or the stages of ``inverse_pass`` from x = 0."""
    if callable(getattr(m, "inverse", None)):
        return m.inverse(z)
    passes = _passes(m)
    y = z
    for k, p in enumerate(passes):
        x = torch.zeros_like(y)
        for _ in range(p):
            x = m.inverse_pass(y, x) if len(passes) == 1 else m.inverse_pass(y, x, k)
        y = x
    return y


def _check_flow(m: nn.Module, spec: DataSpec, x: Tensor, graphs: dict[str, GraphDef]) -> None:
    cls, n, D = type(m).__name__, x.shape[0], spec.dim
    u = torch.full((n, D), 0.5) if spec.discrete else None
    args = (x, u) if spec.discrete else (x,)
    call = "transform(x, u)" if spec.discrete else "transform(x)"
    with torch.no_grad():
        out = _call(cls, call, m.transform, *args)
        _count(cls, call, out, 2, "z (B, D) and log_prob (B,)")
        z, lp = out
        _expect(cls, f"{call} z", z, (n, D))
        _expect(cls, f"{call} log_prob", lp, (n,))
        try:
            back = flow_inverse(m, z).reshape(n, D)
        except ContractError:
            raise
        except Exception as e:
            raise ContractError(f"{cls}: inverting z failed: {type(e).__name__}: {str(e)[:300]}") from None
    y = x.reshape(n, D) + (u if u is not None else 0)
    err = (back - y).abs() / (1 + y.abs())
    if not float(err.max()) <= 1e-3:
        which = "inverse(z)" if "inverse" in graphs else f"{len(_passes(m))} stage(s) of inverse_pass"
        raise ContractError(f"{cls}: {which} does not invert transform: max |f^-1(f(x)) - x| / (1 + |x|) = "
                            f"{float(err.max()):.3g} > 1e-3 (for a fixed-point inverse, raise inverse_passes)")
    _check_logdet(m, spec, x[:2], u[:2] if u is not None else None, lp[:2])


def _check_logdet(m: nn.Module, spec: DataSpec, x: Tensor, u: Tensor | None, lp: Tensor) -> None:
    """log_prob must equal log N(z; 0, I) + log|det dz/dy| with the Jacobian from autograd, row by row.

    In float64 on a copy of the module where it converts (tolerance 1e-3 nats), else in float32 (1e-2).
    """
    try:
        double = copy.deepcopy(m).double()
        wants = _autograd_log_prob(double, spec, x.double(), None if u is None else u.double())
        tol = 1e-3
    except Exception:  # a module that does not copy or run in float64
        wants, tol = _autograd_log_prob(m, spec, x, u), 1e-2
    for r, want in enumerate(wants):
        got = float(lp[r])
        if not abs(got - want) <= tol + 1e-5 * abs(want):
            raise ContractError(f"{type(m).__name__}.transform log_prob {got:.6g} disagrees with log N(z; 0, I) + "
                                f"log|det dz/dx| = {want:.6g} from autograd's Jacobian (row {r}); the "
                                "log-determinant or the base distribution (standard normal) is wrong")


def _autograd_log_prob(m: nn.Module, spec: DataSpec, x: Tensor, u: Tensor | None) -> list[float]:
    D, out = spec.dim, []
    for r in range(x.shape[0]):
        xr = x[r:r + 1]
        if u is None:
            def f(v: Tensor, xr: Tensor = xr) -> Tensor:
                return m.transform(v.reshape(xr.shape))[0].reshape(-1)
            at = xr.reshape(-1)
        else:
            def f(v: Tensor, xr: Tensor = xr) -> Tensor:
                return m.transform(xr, v.reshape(1, D))[0].reshape(-1)
            at = u[r]
        jac = torch.autograd.functional.jacobian(f, at)
        with torch.no_grad():
            z = f(at)
        out.append(-0.5 * (float((z.double() ** 2).sum()) + D * LOG2PI) + float(torch.linalg.slogdet(jac.double())[1]))
    return out


# ---- latent variable (VAE) ----------------------------------------------------------------------------
class LogWeights(nn.Module):
    """log p(x|z) + log p(z) - log q(z|x) for z = mu + exp(logvar / 2) eps, from encoder and decoder; p(z) is the
    module's ``log_prior`` where it has one, else N(z; 0, I)."""

    def __init__(self, m: nn.Module, spec: DataSpec) -> None:
        super().__init__()
        self.m, self.spec = m, spec

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        mu, logvar = self.m.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        flat = x.reshape(x.shape[0], -1)
        out = self.m.decoder(z)
        if self.spec.discrete:
            logits = out[0] if isinstance(out, tuple | list) else out
            logp = torch.log_softmax(logits, dim=-1)
            rec = logp.gather(-1, flat.long().unsqueeze(-1)).squeeze(-1).sum(-1)
        else:
            mean, std = out
            rec = -(0.5 * LOG2PI + torch.log(std) + 0.5 * ((flat - mean) / std) ** 2).sum(-1)
        own_prior = getattr(self.m, "log_prior", None)
        log_prior = own_prior(z) if callable(own_prior) else -0.5 * (z ** 2 + LOG2PI).sum(-1)
        log_q = -0.5 * (eps ** 2 + LOG2PI + logvar).sum(-1)
        return rec + log_prior - log_q


def _latent_dim(m: nn.Module) -> int:
    q = getattr(m, "latent_dim", None)
    if not isinstance(q, int | np.integer) or q < 1:
        raise ContractError(f"{type(m).__name__}.latent_dim must be a whole number >= 1, got {q!r}")
    return int(q)


def _build_vae(m: nn.Module, spec: DataSpec, x: Tensor) -> dict[str, GraphDef]:
    n, q = x.shape[0], _latent_dim(m)
    g = torch.Generator().manual_seed(4)
    dec = ["logits"] if spec.discrete else ["mean", "std"]
    own = callable(getattr(m, "log_weights", None))
    lw = Lambda(m, m.log_weights) if own else LogWeights(m, spec)
    graphs = {"encoder": GraphDef(Lambda(m, m.encoder), {"x": x}, ["mu", "logvar"]),
              "decoder": GraphDef(Lambda(m, m.decoder), {"z": torch.randn(n, q, generator=g)}, dec),
              "log_weights": GraphDef(lw, {"x": x, "eps": torch.randn(n, q, generator=g)}, ["log_weight"])}
    if callable(getattr(m, "prior", None)):  # a learned prior: Sample draws z through it (no graph: z = eps)
        graphs["prior"] = GraphDef(Lambda(m, m.prior), {"eps": torch.randn(n, q, generator=g),
                                                         "u": torch.rand(n, 1, generator=g)}, ["z"])
    return graphs


def _check_vae(m: nn.Module, spec: DataSpec, x: Tensor, graphs: dict[str, GraphDef]) -> None:
    cls, n, q, D = type(m).__name__, x.shape[0], _latent_dim(m), spec.dim
    eps = torch.randn(n, q, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        enc = _call(cls, "encoder(x)", m.encoder, x)
        _count(cls, "encoder(x)", enc, 2, "mu and logvar, each (B, latent_dim)")
        for name, t in zip(("mu", "logvar"), enc, strict=True):
            _expect(cls, f"encoder(x) {name}", t, (n, q))
        dec = _call(cls, "decoder(z)", m.decoder, enc[0])
        if spec.discrete:
            _count(cls, "decoder(z)", dec, 1, "logits (B, D, levels)")
            _expect(cls, "decoder(z) logits", dec[0], (n, D, spec.levels))
        else:
            _count(cls, "decoder(z)", dec, 2, "mean and std, each (B, D)")
            for name, t in zip(("mean", "std"), dec, strict=True):
                _expect(cls, f"decoder(z) {name}", t, (n, D))
        generic = LogWeights(m, spec)(x, eps)
        lw = _call(cls, "log_weights(x, eps)", graphs["log_weights"].module, x, eps)[0]
        if callable(getattr(m, "prior", None)) != callable(getattr(m, "log_prior", None)):
            raise ContractError(f"{cls} has one of prior(eps, u) and log_prior(z) without the other: a learned "
                                "prior needs both, the draw for Sample and the density for the bound")
        if "prior" in graphs:
            u = torch.rand(n, 1, generator=torch.Generator().manual_seed(6))
            z = _call(cls, "prior(eps, u)", graphs["prior"].module, eps, u)
            _count(cls, "prior(eps, u)", z, 1, "z (B, latent_dim)")
            _expect(cls, "prior(eps, u) z", z[0], (n, q))
            _expect(cls, "log_prior(z)", _call(cls, "log_prior(z)", m.log_prior, z[0])[0], (n,))
    _expect(cls, "log_weights(x, eps)", lw, (n,))
    err = float((lw - generic).abs().max())
    if not err <= 1e-3 * (1 + float(generic.abs().max())):
        raise ContractError(f"{cls}.log_weights disagrees with log p(x|z) + log N(z) - log q(z|x) computed from "
                            f"encoder and decoder (max diff {err:.3g} nats)")


# ---- linear Gaussian (pPCA), implicit (GAN), energy ---------------------------------------------------
def _build_linear(m: nn.Module, spec: DataSpec, x: Tensor) -> dict[str, GraphDef]:
    n, q, D = x.shape[0], _latent_dim(m), spec.dim
    g = torch.Generator().manual_seed(6)
    lp_in = {"x": x, "u": torch.rand(n, D, generator=g)} if spec.discrete else {"x": x}
    return {"log_prob": GraphDef(Lambda(m, m.log_density), lp_in, ["log_prob"]),
            "encoder": GraphDef(Lambda(m, m.posterior_mean), {"x": x}, ["z"]),
            "generator": GraphDef(Lambda(m, m.generate), {"z": torch.randn(n, q, generator=g),
                                                          "eps": torch.randn(n, D, generator=g)}, ["x"])}


def _check_linear(m: nn.Module, spec: DataSpec, x: Tensor, graphs: dict[str, GraphDef]) -> None:
    cls, n, q = type(m).__name__, x.shape[0], _latent_dim(m)
    with torch.no_grad():
        for gname, what, shapes in (("log_prob", "log_density", [(n,)]), ("encoder", "posterior_mean(x)", [(n, q)]),
                                    ("generator", "generate(z, eps)", list(_data_shapes(spec, n)))):
            g = graphs[gname]
            out = _call(cls, what, g.module, *g.inputs.values())
            _count(cls, what, out, 1, f"one tensor of shape {shapes[0]}")
            _expect(cls, what, out[0], *shapes)


def _build_implicit(m: nn.Module, spec: DataSpec, x: Tensor) -> dict[str, GraphDef]:
    z = torch.randn(x.shape[0], _latent_dim(m), generator=torch.Generator().manual_seed(7))
    return {"generator": GraphDef(Lambda(m, m.generate), {"z": z}, ["x"])}


def _check_implicit(m: nn.Module, spec: DataSpec, x: Tensor, graphs: dict[str, GraphDef]) -> None:
    cls, g = type(m).__name__, graphs["generator"]
    with torch.no_grad():
        out = _call(cls, "generate(z)", g.module, g.inputs["z"])
    _count(cls, "generate(z)", out, 1, "x")
    _expect(cls, "generate(z)", out[0], *_data_shapes(spec, x.shape[0]))


def _build_energy(m: nn.Module, spec: DataSpec, x: Tensor) -> dict[str, GraphDef]:
    if spec.discrete:  # chains move inside the cells: examples off the integer grid
        x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(8)) - 0.5
    return {"energy": GraphDef(Lambda(m, m.energy), {"x": x}, ["energy"]),
            "energy_grad": GraphDef(Lambda(m, m.energy_grad), {"x": x}, ["energy", "grad"])}


def _check_energy(m: nn.Module, spec: DataSpec, x: Tensor, graphs: dict[str, GraphDef]) -> None:
    cls, n = type(m).__name__, x.shape[0]
    x = graphs["energy"].inputs["x"]
    with torch.no_grad():
        e = _call(cls, "energy(x)", m.energy, x)
        _count(cls, "energy(x)", e, 1, "E (B,)")
        _expect(cls, "energy(x)", e[0], (n,))
        eg = _call(cls, "energy_grad(x)", m.energy_grad, x)
    _count(cls, "energy_grad(x)", eg, 2, "E (B,) and dE/dx (B, *shape)")
    _expect(cls, "energy_grad(x) grad", eg[1], (n, *spec.shape))
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        auto = torch.autograd.grad(m.energy(xr).sum(), xr)[0]
    err = float((eg[1] - auto).abs().max())
    if not err <= 1e-4 * (1 + float(auto.abs().max())):
        raise ContractError(f"{cls}.energy_grad's gradient disagrees with autograd's dE/dx (max diff {err:.3g})")
    if not float((eg[0] - e[0]).abs().max()) <= 1e-4 * (1 + float(e[0].abs().max())):
        raise ContractError(f"{cls}.energy_grad's energy differs from energy(x)")


_BUILDERS: dict[str, Callable[[nn.Module, DataSpec, Tensor], dict[str, GraphDef]]] = {
    "autoregressive": _build_ar, "flow": _build_flow, "latent_variable": _build_vae,
    "linear_gaussian": _build_linear, "implicit": _build_implicit, "energy": _build_energy}
_CHECKS: dict[str, Callable[[nn.Module, DataSpec, Tensor, dict[str, GraphDef]], None]] = {
    "autoregressive": _check_ar, "flow": _check_flow, "latent_variable": _check_vae,
    "linear_gaussian": _check_linear, "implicit": _check_implicit, "energy": _check_energy}


def _extra_parameters(m: nn.Module, spec: DataSpec, fam: Family, graphs: dict[str, GraphDef]) -> dict[str, float]:
    """Parameters the graphs imply: latent sizes and the inverse passes of a fixed-point flow."""
    out: dict[str, float] = {}
    if fam.name in ("latent_variable", "linear_gaussian", "implicit"):
        out["latent_dim"] = float(_latent_dim(m))
    if fam.name == "flow":
        out["latent_dim"] = float(spec.dim)
        if "inverse" not in graphs:
            passes = _passes(m)
            out["inverse_stages"] = float(len(passes))
            out.update({f"inverse_passes_{k}": float(p) for k, p in enumerate(passes)})
    return out


def _check_deterministic(cls: str, graphs: dict[str, GraphDef]) -> None:
    """Every graph gives bit-identical outputs for the same inputs: no randomness inside the module."""
    for gname, g in graphs.items():
        args = tuple(g.inputs.values())
        try:
            with torch.no_grad():
                a, b = g.module(*args), g.module(*args)
        except Exception:  # a graph that fails: the family's checks below name the method and the shapes
            continue
        a = a if isinstance(a, tuple | list) else (a,)
        b = b if isinstance(b, tuple | list) else (b,)
        for name, ta, tb in zip(g.outputs, a, b, strict=False):
            if not torch.equal(ta, tb) and not (torch.isnan(ta) & torch.isnan(tb) | (ta == tb)).all():
                raise ContractError(
                    f"{cls}: graph {gname!r} gives different {name!r} for the same inputs (max diff "
                    f"{float((ta - tb).abs().max()):.3g}): the module draws random numbers inside (torch.rand*, "
                    "dropout in training mode); take the noise as an input instead, as the contract's z, eps and u "
                    "are, so that the server can seed it")
