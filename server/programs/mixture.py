"""A mixture p(x) = sum_k w_k p_k(x) served as one model over its members' programs and graphs.

The manifest (family "mixture") lists its members (ModelManifest.members): each a model of another family with
an exact or bounded likelihood on the same data spec, its graphs in ModelManifest.graphs under
"<prefix>/<graph>" ("m0/logits"). The server opens one batcher per graph as for any model, so a member's calls
merge with the calls of other requests to that member, and the members of one request run concurrently.

* LogLikelihood: log sum_k w_k p_k(x) = log-sum-exp_k (log w_k + log p_k(x)) in float64, exact given the
  members' scores; when a member's score is a lower bound the mixture's is one too (log-sum-exp is increasing
  in every argument), so the mixture's likelihood kind is the weakest member's.
* Sample: one uniform per row from the request's stream picks its member by the weights (inverse CDF); each
  member then samples all of its rows in one call, and the rows come back in request order.
* Noise: member k draws from its own stream ``Noise(derived_seed(seed, k + 1))`` (genserve.core.noise), so the
  members run concurrently and a seed reproduces every number; encode and decode are not offered (the members'
  latent spaces differ).

Example:
    >>> import numpy as np
    >>> from genserve.core.spec import DataSpec
    >>> from genserve.server.programs.base import run_sync
    >>> spec = DataSpec("levels", (2,), "discrete", levels=3)
    >>> class Uniform(Program):  # a stand-in member: p(x) = 1/9 for every x
    ...     operations = ("sample", "log_likelihood")
    ...     async def log_likelihood(self, run, x, noise, **options):
    ...         return np.full(len(x), -np.log(9.0), np.float32)
    >>> mix = MixtureProgram(spec, {}, members=[Member("m0", 0.25, Uniform(spec, {})),
    ...                                          Member("m1", 0.75, Uniform(spec, {}))])
    >>> bool(np.allclose(run_sync(mix.log_likelihood(None, np.zeros((1, 2)), Noise(0))), -np.log(9.0)))
    True
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genserve.core.noise import Noise, categorical_from_uniform, derived_seed
from genserve.core.spec import DataSpec
from genserve.server.programs.base import GraphSignature, Option, Program, Run, SampleResult

FAMILY = "mixture"
KIND_ORDER = ("exact", "lower_bound")
"""Likelihood kinds a member may have, strongest first; a mixture's kind is its weakest member's."""
WEIGHT_SUM_TOL = 1e-6


@dataclass(frozen=True)
class Member:
    """One member: its graph prefix, mixing weight (> 0), serving program and likelihood kind."""

    prefix: str
    weight: float
    program: Program
    likelihood: str = "exact"


def member_noise(noise: Noise, k: int) -> Noise:
    """Member k's own stream of a request seeded ``noise.seed`` (part k + 1; part 0 picks the members)."""
    return Noise(derived_seed(noise.seed, k + 1))


def weakest_kind(kinds: Sequence[str]) -> str:
    """The weakest of the members' likelihood kinds ("exact" only when every member's is)."""
    return max(kinds, key=KIND_ORDER.index)


class MixtureProgram(Program):
    """sum_k w_k p_k(x) over member programs; see the module docstring for the operations and noise."""

    operations = ("sample", "log_likelihood")

    def __init__(self, spec: DataSpec, params: dict[str, float], graphs: dict[str, GraphSignature] | None = None,
                 members: Sequence[Member] = ()) -> None:
        super().__init__(spec, params, graphs)
        if not members:
            raise ValueError("a mixture needs at least one member (ModelManifest.members is empty); re-export it "
                             "with `genserve mixture`")
        weights = np.array([m.weight for m in members], dtype=np.float64)
        if not (np.isfinite(weights).all() and (weights > 0).all()) or abs(weights.sum() - 1) > WEIGHT_SUM_TOL:
            raise ValueError(f"mixture weights must be > 0 and sum to 1, got {weights.tolist()}; re-export it")
        prefixes = [m.prefix for m in members]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"mixture member prefixes {prefixes} repeat; each must be unique")
        for m in members:
            if m.likelihood not in KIND_ORDER:
                raise ValueError(f"member {m.prefix} has likelihood kind {m.likelihood!r}; a mixture combines "
                                 f"members with {' or '.join(KIND_ORDER)} likelihoods only")
            lacking = [op for op in self.operations if op not in m.program.operations]
            if lacking:
                raise ValueError(f"member {m.prefix} ({type(m.program).__name__}) cannot {', '.join(lacking)}, "
                                 "which a mixture needs of every member")
        self.members = tuple(members)
        self.log_weights = np.log(weights)
        self.likelihood_kind = weakest_kind([m.likelihood for m in members])
        # Every option a member takes for sample or log_likelihood, declared once (the first member's
        # declaration); a request's option goes to the members that take it.
        seen: dict[tuple[str, str], Option] = {}
        for m in members:
            for o in m.program.options:
                if o.operation in self.operations:
                    seen.setdefault((o.operation, o.name), o)
        self.options = tuple(seen.values())
        # An option's default names a program parameter ("dequant_draws"): the mixture's is the member's that
        # declared the option, so whoever asks the mixture for the served default gets the member's.
        for o in self.options:
            if isinstance(o.default, str) and o.default not in self.params:
                owner = next(m for m in members if o.name in m.program.declared(o.operation))
                if o.default in owner.program.params:
                    self.params[o.default] = owner.program.params[o.default]

    async def member_log_likelihoods(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        """(K, N) float64: member k's own log-likelihood of each row (its stream ``member_noise(noise, k)``)."""
        scores = await asyncio.gather(*(
            m.program.log_likelihood(_prefixed(run, m.prefix), x, member_noise(noise, k),
                                     **_taken(m.program, "log_likelihood", options))
            for k, m in enumerate(self.members)))
        return np.stack([np.asarray(s, dtype=np.float64) for s in scores])

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        """log sum_k w_k p_k(x) in nats per row, (N,) float64: log-sum-exp of log w_k + the members' scores."""
        return log_mix(self.log_weights, await self.member_log_likelihoods(run, x, noise, **options))

    def choose(self, n: int, noise: Noise) -> np.ndarray:
        """Member index per row (n,) int: one ``noise.uniform(n)`` against the cumulative weights."""
        probs = np.broadcast_to(np.exp(self.log_weights), (n, len(self.members)))
        return categorical_from_uniform(probs, noise.uniform(n)).astype(np.int64)

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        """n rows in the data domain; row i from member ``choose(n, noise)[i]``, each member's rows drawn in
        one call of its own sample (its stream, ``temperature`` and the options it takes), in row order."""
        choice = self.choose(n, noise)
        picked = [(k, np.flatnonzero(choice == k)) for k in range(len(self.members))]
        picked = [(k, rows) for k, rows in picked if len(rows)]
        results = await asyncio.gather(*(
            self.members[k].program.sample(_prefixed(run, self.members[k].prefix), len(rows), member_noise(noise, k),
                                           temperature, **_taken(self.members[k].program, "sample", options))
            for k, rows in picked))
        x = np.zeros((n, *self.spec.shape), dtype=np.float32)
        for (_, rows), result in zip(picked, results, strict=True):
            x[rows] = np.asarray(result.x, dtype=np.float32).reshape(len(rows), *self.spec.shape)
        return SampleResult(x)


def log_mix(log_weights: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """log sum_k exp(log_weights[k] + scores[k]) per column, (N,) float64; rows of -inf stay -inf."""
    a = np.asarray(log_weights, dtype=np.float64)[:, None] + np.asarray(scores, dtype=np.float64)
    top = a.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(top), safe + np.log(np.exp(a - safe).sum(axis=0)), top)


def _prefixed(run: Run, prefix: str) -> Run:
    """The member's ``run``: its graph names under the mixture's prefix, through the mixture's batchers."""
    async def member_run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await run(f"{prefix}/{graph}", feeds)

    return member_run


def _taken(program: Program, operation: str, options: dict[str, Any]) -> dict[str, Any]:
    """Of the request's (checked) options, those ``program`` declares for ``operation``."""
    declared = program.declared(operation)
    return {k: v for k, v in options.items() if k in declared}


def mixture_from_manifest(manifest: Any) -> MixtureProgram:
    """The MixtureProgram of a family "mixture" ModelManifest: a program per member over its prefixed graphs;
    ValueError naming what is wrong (no members, a graph no member owns, a member without a likelihood)."""
    from genserve.core.manifest import LIKELIHOOD_NAME, spec_from_proto
    from genserve.server.programs import program_class, signatures

    if not manifest.members:
        raise ValueError("a mixture needs at least one member (ModelManifest.members is empty); re-export it "
                         "with `genserve mixture`")
    spec = spec_from_proto(manifest.data)
    sigs = signatures(manifest.graphs)
    members, owned = [], set()
    for i, m in enumerate(manifest.members):
        if not m.prefix or "/" in m.prefix:
            raise ValueError(f"mixture member {i} has prefix {m.prefix!r}; use a non-empty name without '/'")
        if m.family == FAMILY:
            raise ValueError(f"mixture member {m.prefix} is itself a mixture; list its members instead")
        mine = {name[len(m.prefix) + 1:]: sig for name, sig in sigs.items() if name.startswith(m.prefix + "/")}
        if not mine:
            raise ValueError(f"mixture member {m.prefix} has no graphs (expected names {m.prefix}/<graph> in "
                             f"graphs, found {sorted(sigs)}); re-export the mixture")
        owned |= {f"{m.prefix}/{g}" for g in mine}
        program = program_class(m.family, m.model)(spec, dict(m.parameters), mine)
        members.append(Member(m.prefix, float(m.weight), program, LIKELIHOOD_NAME.get(m.likelihood, "unspecified")))
    stray = sorted(set(sigs) - owned)
    if stray:
        raise ValueError(f"graphs {stray} belong to no mixture member; name them <member prefix>/<graph>")
    return MixtureProgram(spec, dict(manifest.parameters), sigs, members)


__all__ = ["FAMILY", "Member", "MixtureProgram", "log_mix", "member_noise", "mixture_from_manifest", "weakest_kind"]
