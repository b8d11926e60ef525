"""Several checkpoints on the same data as one served model: p(x) = sum_k w_k p_k(x), family "mixture".

    build_mixture(["runs/arrnn-s0.pt", "runs/arrnn-s1.pt", "runs/arcnn.pt"], "models", name="digits-mix")
        -> models/digits-mix/1/{m0.logits.onnx, m0.step.onnx, m1..., m2.logits.onnx, manifest.json}

Each member must model the same data spec, on the same validation and test splits, with an exact or bounded
likelihood. The weights are fitted on the validation split by EM on the members' per-row log-likelihoods (the
mixture log-likelihood is concave in the weights, so EM reaches the best weights); members whose weight ends
below ``min_weight`` are left out and the rest refitted, so none is served for nothing. Each member is then
exported with export.repository's checked path (contract, ONNX parity, its own operations over ONNX Runtime vs
PyTorch), its graphs renamed "m<k>/<graph>", and the mixture program (server/programs/mixture.py) over the ONNX
graphs must reproduce the PyTorch mixture (log-likelihood within export.parity's tolerance, the same samples).
Its served scores are calibrated on the validation split as any exported model's are (export/calibration.py),
so percentiles and score kinds work. The version folder appears only when all of that passed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genserve.core.manifest import (
    FORMAT_VERSION,
    LIKELIHOOD,
    MANIFEST,
    OPERATION,
    read_manifest,
    spec_to_proto,
)
from genserve.core.noise import Noise
from genserve.v1 import manifest_pb2 as pb

SCORE_ROWS = 500
"""Rows per PyTorch scoring call when fitting the weights (bounds memory for big splits)."""


def fit_weights(scores: np.ndarray, iterations: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Mixing weights (K,) maximising mean_n log sum_k w_k exp(scores[k, n]) by EM, from uniform weights.

    ``scores`` (K, N) are the members' log-likelihoods (nats) of N held-out rows. An E step gives each row's
    responsibilities r_kn proportional to w_k p_k(x_n), the M step sets w_k = mean_n r_kn; the objective is
    concave in w, so the fixed point is the optimum. Stops when no weight moves by more than ``tol``.

    Example:
        >>> s = np.log(np.array([[0.9, 0.9, 0.1], [0.1, 0.1, 0.9]]))  # member 0 fits rows 0, 1; member 1 row 2
        >>> w = fit_weights(s)
        >>> bool(w[0] > w[1] and abs(w.sum() - 1) < 1e-12)
        True
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not np.isfinite(s).all():
        raise ValueError(f"member scores must be a finite (members, rows) array, got shape {s.shape}")
    w = np.full(len(s), 1.0 / len(s))
    for _ in range(iterations):
        with np.errstate(divide="ignore"):  # a weight that reached 0 stays 0
            a = np.log(w)[:, None] + s
        r = np.exp(a - a.max(axis=0))
        new = (r / r.sum(axis=0)).mean(axis=1)
        done = np.abs(new - w).max() <= tol
        w = new
        if done:
            break
    return w / w.sum()


def mixture_nll(weights: np.ndarray, scores: np.ndarray) -> float:
    """Mean -log sum_k w_k p_k(x_n) in nats per row."""
    from genserve.server.programs.mixture import log_mix

    return float(-log_mix(np.log(weights), scores).mean())


@dataclass
class MemberSource:
    """A member checkpoint: its model (eval mode), checkpoint dict, path and sha256."""

    path: Path
    model: Any
    ckpt: dict[str, Any]
    sha256: str


class MixtureReference:
    """The PyTorch mixture over the members' own models, in the mixture program's noise order: the reference
    that export.parity.check_operations compares the served program with."""

    operations = ("sample", "log_likelihood")

    def __init__(self, models: Sequence[Any], weights: np.ndarray) -> None:
        self.models, self.weights = list(models), np.asarray(weights, dtype=np.float64)
        self.spec = self.models[0].spec

    def log_prob(self, x: Any, noise: Noise, **options: Any) -> Any:
        import torch

        from genserve.server.programs.mixture import member_noise

        scores = torch.stack([m.log_prob(x, member_noise(noise, k)).double() for k, m in enumerate(self.models)])
        return torch.logsumexp(torch.from_numpy(np.log(self.weights))[:, None] + scores, dim=0)

    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Any:
        import torch

        from genserve.server.programs.mixture import member_noise
        from genserve.training.base import categorical_from_uniform

        logits = torch.from_numpy(np.log(self.weights)).expand(n, len(self.models))  # softmax gives w back
        choice = categorical_from_uniform(logits, torch.from_numpy(noise.uniform(n))).long()
        x = torch.zeros(n, *self.spec.shape)
        for k, m in enumerate(self.models):
            rows = torch.nonzero(choice == k)[:, 0]
            if len(rows):
                x[rows] = m.sample(len(rows), member_noise(noise, k), temperature).float().reshape(
                    len(rows), *self.spec.shape)
        return x


def load_members(checkpoints: Sequence[str | Path]) -> tuple[list[MemberSource], Any]:
    """The members' models and their common data set (validation and test splits); ValueError naming the
    checkpoint that has no likelihood, another data spec or other splits."""
    from genserve.export.repository import sha256_file
    from genserve.training.checkpoint import load_checkpoint
    from genserve.training.data import load_dataset

    if len(checkpoints) < 1:
        raise ValueError("give at least one member checkpoint")
    members, data = [], None
    for path in checkpoints:
        model, ckpt = load_checkpoint(path)
        kind = getattr(model, "likelihood_kind", "none")
        if "log_likelihood" not in model.operations or kind not in ("exact", "lower_bound"):
            raise ValueError(f"{path}: a {model.name} model's likelihood is {kind}; a mixture needs members with "
                             "exact or lower-bound likelihoods (autoregressive, flow, pPCA, VAE)")
        cfg = ckpt.get("config") or {}
        d = load_dataset(cfg.get("dataset", model.spec.name), seed=int(cfg.get("seed", 0)),
                         levels=int(cfg.get("levels", 0)))
        if data is None:
            data, first = d, path
        elif model.spec != data.spec:
            raise ValueError(f"{path} models {model.spec.name} {list(model.spec.shape)} ({model.spec.kind}), "
                             f"{first} models {data.spec.name} {list(data.spec.shape)} ({data.spec.kind}); a "
                             "mixture's members must share one data spec")
        elif not (np.array_equal(d.val, data.val) and np.array_equal(d.test, data.test)):
            raise ValueError(f"{path} was trained with other validation/test splits than {first} (dataset or "
                             "seed differ), so one member may have trained on rows another is scored on; "
                             "train the members with the same dataset and seed")
        members.append(MemberSource(Path(path), model, ckpt, sha256_file(path)))
    return members, data


def member_scores(models: Sequence[Any], x: np.ndarray, seed: int) -> np.ndarray:
    """(K, N) float64 log-likelihoods of rows ``x`` by each PyTorch member, member k in its mixture stream."""
    import torch

    from genserve.server.programs.mixture import member_noise

    out = []
    with torch.no_grad():
        for k, m in enumerate(models):
            noise, parts = member_noise(Noise(seed), k), []
            for i in range(0, len(x), SCORE_ROWS):
                parts.append(m.log_prob(torch.as_tensor(x[i:i + SCORE_ROWS]), noise).double().numpy())
            out.append(np.concatenate(parts))
    return np.stack(out)


def build_mixture(checkpoints: Sequence[str | Path], repo: str | Path, name: str | None = None,
                  version: int | None = None, *, force: bool = False, seed: int = 0, min_weight: float = 1e-3,
                  log: Callable[[str], Any] = print, report: dict[str, Any] | None = None) -> Path:
    """Fit, export and check the mixture of ``checkpoints``; returns REPO/NAME/VERSION (see the module doc).

    NAME defaults to ``<dataset>-mixture``. ``seed`` seeds the scoring noise of the weight fit and of the test
    number (the served LogLikelihood of the whole test split with that seed). ``report`` (if given) receives
    the weights and the validation and test NLLs of the mixture and of each member (nats per row).
    """
    from genserve.core.manifest import write_manifest
    from genserve.export.calibration import builtin_data, calibrate
    from genserve.export.parity import check_operations
    from genserve.export.repository import (
        CHECK_ROWS,
        export_checkpoint,
        name_stem,
        new_version,
        sha256_file,
        tool_versions,
    )
    from genserve.server.programs.base import run_sync
    from genserve.server.programs.mixture import log_mix, mixture_from_manifest, weakest_kind
    from genserve.server.sessions import DirectRunner
    from genserve.training.trainer import code_revision

    if not 0 <= min_weight < 1:
        raise ValueError(f"min_weight must be in [0, 1), got {min_weight}")
    start = time.perf_counter()
    report = report if report is not None else {}
    sources, data = load_members(checkpoints)
    spec = data.spec
    val, test = np.asarray(data.val, np.float32), np.asarray(data.test, np.float32)
    log(f"mixture of {len(sources)} members on {spec.name}: scoring {len(val)} validation rows")
    val_scores = member_scores([s.model for s in sources], val, seed)
    keep = list(range(len(sources)))
    weights = fit_weights(val_scores)
    while len(keep) > 1 and (weights.min() < min_weight or weights.min() <= 0):
        drop = keep[int(weights.argmin())]
        log(f"  {sources[drop].path}: weight {weights.min():.2g} < {max(min_weight, 1e-300):g}, left out")
        keep.remove(drop)
        weights = fit_weights(val_scores[keep])
    kept = [sources[i] for i in keep]
    report["validation_nll_nats"] = mixture_nll(weights, val_scores[keep])
    report["members"] = [{"checkpoint": str(s.path), "model": s.model.name, "validation_nll_nats":
                          float(-val_scores[i].mean())} for i, s in enumerate(sources)]
    for w, i in zip(weights, keep, strict=True):
        report["members"][i]["weight"] = float(w)
    log("  weights (EM on validation): " + ", ".join(f"{s.model.name} {w:.3f}" for s, w in zip(kept, weights,
                                                                                                strict=True))
        + f"; validation NLL {report['validation_nll_nats']:.3f} nats (best member "
        f"{min(-val_scores[i].mean() for i in keep):.3f})")

    target = name or f"{name_stem(spec.name)}-mixture"
    with new_version(Path(repo), target, version, force) as (model_dir, version, stage):
        graphs, members = [], []
        for j, (s, w) in enumerate(zip(kept, weights, strict=True)):
            prefix = f"m{j}"
            folder = export_checkpoint(s.path, stage / ".members", name=prefix, version=1,
                                       log=lambda line: log("  " + line))
            mm = read_manifest(folder / MANIFEST)
            for g in mm.graphs:
                renamed = pb.GraphSpec()
                renamed.CopyFrom(g)
                renamed.name, renamed.file = f"{prefix}/{g.name}", f"{prefix}.{g.file}"
                shutil.move(folder / g.file, stage / renamed.file)
                if g.fp16_file:
                    renamed.fp16_file = f"{prefix}.{g.fp16_file}"
                    shutil.move(folder / g.fp16_file, stage / renamed.fp16_file)
                graphs.append(renamed)
            members.append(pb.MixtureMember(prefix=prefix, family=mm.family, model=mm.model, weight=float(w),
                                            parameters=dict(mm.parameters), likelihood=mm.capabilities.likelihood,
                                            source=f"{s.path} sha256:{s.sha256}"))
        shutil.rmtree(stage / ".members")

        kinds = [s.model.likelihood_kind for s in kept]
        kind = weakest_kind(kinds)
        m = pb.ModelManifest(
            format_version=FORMAT_VERSION, name=model_dir.name, version=version, family="mixture", model="mixture",
            description=f"mixture of {len(kept)} on {spec.name}: " + ", ".join(
                f"{s.model.name} w={w:.3f}" for s, w in zip(kept, weights, strict=True)),
            data=spec_to_proto(spec), graphs=graphs, members=members,
            capabilities=pb.Capabilities(
                training_stability="stable", likelihood=LIKELIHOOD[kind],
                sampling_speed="slow" if any(s.model.capabilities.sampling != "fast" for s in kept) else "fast",
                compression="lossless" if kind == "exact" else "lossy", representation=False),
            operations=[OPERATION["sample"], OPERATION["log_likelihood"]])
        program = mixture_from_manifest(m)
        for k, v in program.params.items():  # the served defaults of the options it forwards (dequant_draws, ...)
            m.parameters[k] = float(v)
        runner = DirectRunner.from_files({g.name: stage / g.file for g in graphs})

        ref = MixtureReference([s.model for s in kept], weights)
        ops = check_operations(ref, program, runner, test[:CHECK_ROWS])
        log(f"  mixture operations over ONNX Runtime vs PyTorch: {ops.summary()}")

        calibration = builtin_data(kept[0].ckpt, spec)  # the members share these splits (load_members)
        if calibration is not None:
            cal = calibrate(program, runner, spec, kind, calibration, tuple(program.operations))
            cal.apply(m)
            log(f"  calibration: {cal.summary()}")

        scores = run_sync(program.member_log_likelihoods(runner, test, Noise(seed)))
        test_lp = log_mix(program.log_weights, scores)
        report["test_nll_nats"] = float(-test_lp.mean())
        for i, row in zip(keep, scores, strict=True):
            report["members"][i]["test_nll_nats"] = float(-row.mean())
        report["weights"] = [float(w) for w in weights]
        m.test_metrics["nll_nats"] = report["test_nll_nats"]
        m.test_metrics["bits_per_dim"] = report["test_nll_nats"] / (spec.dim * math.log(2))
        m.test_metrics["validation_nll_nats"] = report["validation_nll_nats"]
        for mem, row in zip(members, scores, strict=True):
            m.test_metrics[f"{mem.prefix}.nll_nats"] = float(-row.mean())
        log(f"  test NLL {report['test_nll_nats']:.3f} nats/row (served, seed {seed}); members "
            + ", ".join(f"{mem.prefix} {-row.mean():.3f}" for mem, row in zip(members, scores, strict=True)))

        prov = m.provenance
        prov.training_config_json = json.dumps({
            "mixture_of": [str(s.path) for s in kept], "left_out": [str(sources[i].path) for i in
                                                                  range(len(sources)) if i not in keep],
            "weights": "EM on the validation split", "seed": seed, "min_weight": min_weight}, sort_keys=True)
        prov.code_revision = code_revision()
        prov.created_at.GetCurrentTime()
        prov.tool_versions.update(tool_versions())
        for p in sorted(stage.iterdir()):
            prov.file_sha256[p.name] = sha256_file(p)
        write_manifest(m, stage / MANIFEST)

    report["seconds"] = time.perf_counter() - start
    log(f"wrote {model_dir / str(version)} ({len(graphs)} graphs of {len(kept)} members) in "
        f"{report['seconds']:.1f} s")
    return model_dir / str(version)
