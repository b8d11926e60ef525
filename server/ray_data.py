"""Scoring and sampling as Ray Data jobs: Ray actors that run the engine in-process (no gRPC hop).

Each actor opens a genserve.server.local.LocalEngine on the model repository (the same Engine, family programs
and ONNX Runtime sessions a server runs) and gets its rows from a Ray Dataset through ``map_batches``; the
answers are the server's, bit for bit, for the same seed (tests/server/test_ray_data.py):

* ``score_dataset(ds, repo, model, seed=S, chunk_size=C)`` equals ``genserve score --seed S --chunk-size C``
  (``Client.score_stream``) on the same rows: row i belongs to chunk k = i // C, rows [kC, min(N, (k+1)C)),
  scored as one LogLikelihood request with seed ``derived_seed(S, kC)``. Rows get their number from their
  position in the dataset (``Dataset.zip`` with a range, run with ``preserve_order``), so the mapping does not
  depend on how Ray cuts blocks and batches. A batch of ``batch_size = C`` rows usually is one whole chunk;
  where Ray's block boundaries cut a chunk, the actor scores the whole chunk with the rows it lacks replaced
  by an in-domain filler and keeps its own rows: a program's noise draws depend only on the chunk's row count
  and each row's position in it, never on the values, and each row's score depends only on its own row (row
  independence, tests/server/test_row_independence.py), so the kept rows are the server's.
* ``sample_dataset(repo, model, n, seed=S)`` equals ``Client.sample(model, n, seed=S)`` / ``genserve sample``
  (SampleStream): block k of 256 rows seeded ``derived_seed(S, k)``; the records of the job are the blocks.

The repository and the input files must be readable at the same path by every Ray worker: a local path on one
machine, a shared volume (NFS, a PersistentVolumeClaim mounted in every KubeRay pod) on a cluster. Ray itself
is an optional extra (``pip install 'genserve[ray]'``); connect to a running cluster with
``ray.init(address="ray://HEAD:10001")`` (a KubeRay head's client port) before calling these, or let them
start a local Ray.

Example::

    import ray
    from genserve.server.ray_data import collect_scores, read_dataset, score_dataset

    ray.init()                                                       # or ray.init(address="ray://head:10001")
    ds = read_dataset("records.parquet")                             # or any ray.data.Dataset of rows
    scored = score_dataset(ds, "/shared/models", "digits-realnvp", seed=1, concurrency=4)
    scores = collect_scores(scored)                                  # .log_prob (N,) nats in row order
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

from genserve.core.noise import derived_seed
from genserve.server.errors import EngineError
from genserve.server.local import STREAM_BLOCK_ROWS, LocalEngine, block_rows, fit_rows

ROW = "row"
"""Output column: the row's number in the input (0-based), or the sample's number."""
INDEX = "__genserve_row"
"""Input column added to number the rows (dropped from the output)."""
LOG_PROB, BITS_PER_DIM, KIND, VERSION = "log_prob", "bits_per_dim", "kind", "version"
"""Output columns of a scoring job: nats (float64), bits/dim (float64, NaN for unnormalized models), the
likelihood kind (exact, lower_bound, unnormalized) and the model version that answered."""
SCORE_PREFIX, PERCENTILE, PERCENTILE_PREFIX = "score_", "percentile", "percentile_"
"""Output columns with ``scores=`` / ``percentile=True``: ``score_<kind>``, ``percentile`` (log_prob's) and
``percentile_<kind>``, float64 (the OIP output names)."""
SAMPLES, LATENTS = "x", "latents"
"""Output columns of a sampling job: (rows, *shape) float32 samples and, when asked for, (rows, q) latents."""
SAMPLE_THREADS = 4
"""Blocks an actor samples at once: their steps merge in its batcher, as a server's SampleStream computes
several blocks ahead."""


@dataclass(frozen=True)
class Scores:
    """The collected scores of a job, in row order."""

    log_prob: np.ndarray
    """(N,) float64 nats."""
    bits_per_dim: np.ndarray | None
    """(N,) float64; None for unnormalized models."""
    kind: str
    version: int
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """The score kinds asked for (``scores=``), each (N,) float64, by name."""
    percentiles: dict[str, np.ndarray] = field(default_factory=dict)
    """With ``percentile=True``: "log_prob" and each kind asked for, (N,) float64 in [0, 100], low = anomalous."""

    def __len__(self) -> int:
        return len(self.log_prob)


# ---- reading -----------------------------------------------------------------------------------------------

def read_dataset(path: str | Path, key: str | None = None) -> ray.data.Dataset:
    """A Ray Dataset of the rows of a .npy, .csv, .parquet (a file or a folder of them) or .npz file, read by
    the Ray workers (the path must be theirs too), as ``genserve score`` reads them: a CSV's first line is a
    header only when one of its fields is not a number; a .npz (``key``: its array, default x or the only
    one) is read here and sent to the cluster."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return ray.data.read_numpy(str(path))
    if suffix == ".parquet":
        return ray.data.read_parquet(str(path))
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        header = _csv_has_header(path)
        return ray.data.read_csv(str(path), read_options=pacsv.ReadOptions(autogenerate_column_names=not header),
                                 parse_options=pacsv.ParseOptions(ignore_empty_lines=True))
    if suffix == ".npz":
        with np.load(path) as archive:
            names = list(archive.files)
            key = key or ("x" if "x" in names else names[0] if len(names) == 1 else None)
            if key is None or key not in names:
                raise ValueError(f"{path} holds {names}; name the array to read (key / --key)")
            return ray.data.from_numpy(archive[key])
    raise ValueError(f"{path}: unknown file type {suffix or '(none)'}; use .npy, .npz, .csv or .parquet")


def _csv_has_header(path: Path) -> bool:
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    try:
        np.loadtxt(io.StringIO(first), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError:
        return bool(first)
    return False


# ---- scoring -----------------------------------------------------------------------------------------------

def score_dataset(ds: ray.data.Dataset, repo: str | Path, model: str, *, seed: int, chunk_size: int = 4096,
                  importance_samples: int | None = None, version: int = 0, concurrency: int = 1,
                  num_cpus: float = 1, row_column: str | None = None,
                  settings: dict[str, Any] | None = None, scores: Sequence[str] = (), percentile: bool = False,
                  draws: int | None = None) -> ray.data.Dataset:
    """Score every row of ``ds`` with ``model`` of the repository ``repo`` in ``concurrency`` Ray actors.

    ``ds``: rows in order; its columns, in order, make one example (one tensor column of (8, 8) images, one
    list column, or D scalar columns of a CSV/Parquet file; flat rows are reshaped to the model's shape).
    ``row_column``: a column of ``ds`` that holds each row's number 0..N-1 (it then need not be in order and
    streams through); without one, rows are numbered by their position (``Dataset.zip`` with a range, in
    order), which holds the dataset in Ray's object store (spilled to disk beyond it) before the actors start.
    Returns a lazy Dataset of the columns ``row``, ``log_prob``, ``bits_per_dim``, ``kind``, ``version``
    (``collect_scores`` gathers them in row order; ``write_parquet`` keeps them on the cluster). ``settings``:
    LocalEngine settings for each actor (ServerConfig fields: ``max_batch_size``, ``provider``, ...).
    ``scores``, ``percentile``, ``draws``: as LogLikelihood takes them (docs/scoring.md); they add the columns
    ``score_<kind>``, ``percentile`` (log_prob's) and ``percentile_<kind>``. Per-batch kinds (typicality) are
    refused: where Ray cuts a chunk the actor fills in rows, which would change a per-batch statistic.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores = [scores] if isinstance(scores, str) else list(scores)
    per_batch = [k for k in scores if _per_batch(repo, model, version, k)]
    if per_batch:
        raise ValueError(f"score kind {', '.join(per_batch)} is computed over a request's rows as one batch, which "
                         "a Ray job does not keep whole; use a per-row kind (e.g. typicality_row) or genserve score")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    columns = list(ds.columns())
    total = ds.count()
    if total == 0:
        raise ValueError("the dataset has no rows")
    if row_column is not None:
        if row_column not in columns:
            raise ValueError(f"row_column {row_column!r} is not a column of the dataset; it has {columns}")
        columns.remove(row_column)
        indexed = ds.rename_columns({row_column: INDEX})
    else:
        numbers = ray.data.range(total).map_batches(_numbered, batch_format="numpy")
        numbers.context.execution_options.preserve_order = True
        ds.context.execution_options.preserve_order = True
        with warnings.catch_warnings():
            # Dataset.zip is deprecated from Ray 2.5x (to be removed in 2.64, hence the extra's cap): it pairs
            # rows by position, which holds here because both sides run with preserve_order.
            warnings.simplefilter("ignore", DeprecationWarning)
            zipped = ds.zip(numbers)
        zipped.context.execution_options.preserve_order = True
        # Materialized: the zip holds every row anyway, and actors that take every CPU of the cluster would
        # otherwise starve the reading tasks upstream of them.
        indexed = aligned(zipped.materialize(), total, chunk_size, concurrency)
    scored = indexed.map_batches(
        ChunkScorer, batch_size=chunk_size if row_column is not None else None, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
        fn_constructor_kwargs={"repo": str(repo), "model": model, "seed": int(seed), "chunk_size": chunk_size,
                               "total": total, "columns": columns, "importance_samples": importance_samples,
                               "version": version, "settings": dict(settings or {}), "scores": tuple(scores),
                               "percentile": bool(percentile), "draws": draws})
    scored.context.execution_options.preserve_order = True
    return scored


def _per_batch(repo: str | Path, model: str, version: int, kind: str) -> bool:
    """Whether ``kind`` is a per-batch score kind of the model version's manifest (False when it has no such
    kind: the engine answers that with the kinds it has)."""
    from genserve.core.manifest import MANIFEST, read_manifest
    from genserve.server.repository import scan

    found = scan(Path(repo)).get(model) or []
    chosen = version or (max(found) if found else 0)
    path = Path(repo) / model / str(chosen) / MANIFEST
    if not path.is_file():
        return False
    return any(k.name == kind and k.per_batch for k in read_manifest(path).score_kinds)


def aligned(ds: ray.data.MaterializedDataset, total: int, chunk_size: int, concurrency: int) -> ray.data.Dataset:
    """``ds`` cut into parts of whole chunks (a multiple of chunk_size rows, about 4 parts per actor, at most
    PART_CHUNKS chunks each), so that its blocks begin and end on chunk boundaries except where the input's own
    blocks did. Each actor then takes whole blocks (``batch_size=None``): Ray's batches of chunk_size rows are
    cut from the start of each block, so in a block that starts inside a chunk every batch would straddle two
    chunks and each chunk be scored twice (measured: a 200k-row .npy read as 4 blocks of 50000 rows)."""
    per_part = chunk_size * min(PART_CHUNKS, max(1, math.ceil(total / (chunk_size * 4 * concurrency))))
    cuts = list(range(per_part, total, per_part))
    if not cuts:
        return ds
    parts = ds.split_at_indices(cuts)
    return parts[0].union(*parts[1:])


PART_CHUNKS = 64
"""Most chunks of one part in ``aligned`` (bounds an actor's batch: 64 x 4096 digit rows are 64 MiB)."""


def _numbered(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {INDEX: batch["id"].astype(np.int64)}


class ChunkScorer:
    """A Ray actor's work in ``score_dataset``: a LocalEngine, and the chunks of the rows of each batch."""

    def __init__(self, repo: str, model: str, seed: int, chunk_size: int, total: int, columns: Sequence[str],
                 importance_samples: int | None, version: int, settings: dict[str, Any], scores: tuple[str, ...] = (),
                 percentile: bool = False, draws: int | None = None) -> None:
        self.engine = LocalEngine(repo, models=[model], **settings)
        self.asks = {"scores": tuple(scores), "percentile": percentile, "draws": draws}
        self.model, self.seed, self.chunk_size, self.total = model, seed, chunk_size, total
        self.columns, self.importance_samples = list(columns), importance_samples
        self.version = self.engine.version(model, version)
        self.spec = self.engine.spec(model, self.version)
        self.filler = min(max(0.0, self.spec.low), self.spec.high)
        """A value in every data domain (the warm-up's): what stands in for the rows of a chunk a batch lacks."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch[INDEX], dtype=np.int64)
        x = fit_rows(examples(batch, self.columns), self.spec.shape)
        log_prob = np.empty(len(rows), np.float64)
        bpd = np.full(len(rows), np.nan, np.float64)
        extra: dict[str, np.ndarray] = {}
        kind = "exact"
        chunk_of = rows // self.chunk_size
        for k in np.unique(chunk_of):
            mine = np.flatnonzero(chunk_of == k)
            start = int(k) * self.chunk_size
            length = min(self.chunk_size, self.total - start)
            at = rows[mine] - start
            if len(mine) == length and np.array_equal(at, np.arange(length)):
                chunk = x[mine]
            else:  # Ray cut this chunk: score it whole, the rows it lacks filled in, and keep ours
                chunk = np.full((length, *self.spec.shape), self.filler, np.float32)
                chunk[at] = x[mine]
            try:
                result = self.engine.log_likelihood(self.model, chunk, derived_seed(self.seed, start),
                                                    importance_samples=self.importance_samples,
                                                    version=self.version, **self.asks)
            except EngineError as e:  # name the rows: the engine's message counts rows within the chunk
                raise type(e)(f"chunk of rows {start}..{start + length - 1}: {e}") from None
            log_prob[mine] = result.log_prob[at]
            if result.bits_per_dim is not None:
                bpd[mine] = result.bits_per_dim[at]
            named = {SCORE_PREFIX + k: v for k, v in result.scores.items()}
            named.update({PERCENTILE if k == LOG_PROB else PERCENTILE_PREFIX + k: v
                          for k, v in result.percentiles.items()})
            for name, values in named.items():
                extra.setdefault(name, np.empty(len(rows), np.float64))[mine] = values[at]
            kind = result.kind
        return {ROW: rows, LOG_PROB: log_prob, BITS_PER_DIM: bpd, KIND: np.full(len(rows), kind),
                VERSION: np.full(len(rows), self.version, np.int64), **extra}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def examples(batch: dict[str, np.ndarray], columns: Sequence[str]) -> np.ndarray:
    """The batch's examples as float32 (rows, values...): one tensor column as it is; otherwise the columns in
    order, each flattened (a list column holds one whole example per row), side by side."""
    if len(columns) == 1:
        values = batch[columns[0]]
        values = np.stack(values) if values.dtype == object else values
        return np.asarray(values, dtype=np.float32)
    parts = []
    for name in columns:
        values = batch[name]
        values = np.stack(values) if values.dtype == object else values
        parts.append(np.asarray(values, dtype=np.float32).reshape(len(values), -1))
    return np.concatenate(parts, axis=1)


def collect_scores(scored: ray.data.Dataset) -> Scores:
    """The scores of a ``score_dataset`` job on this machine, in row order (one model version, one kind)."""
    rows, log_prob, bpd, kinds, versions = [], [], [], set(), set()
    extra: dict[str, list[np.ndarray]] = {}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch[ROW])
        log_prob.append(batch[LOG_PROB])
        bpd.append(batch[BITS_PER_DIM])
        for name in batch:
            if name.startswith((SCORE_PREFIX, PERCENTILE)):
                extra.setdefault(name, []).append(batch[name])
        kinds.update(np.unique(batch[KIND]).tolist())
        versions.update(np.unique(batch[VERSION]).tolist())
    if not rows:
        raise ValueError("no rows were scored")
    if len(versions) > 1:
        raise RuntimeError(f"the job's actors answered with model versions {sorted(versions)} (the repository "
                           "changed during the job); name a version to score with one")
    order = np.argsort(np.concatenate(rows), kind="stable")
    numbers = np.concatenate(rows)[order]
    if not np.array_equal(numbers, np.arange(len(numbers))):
        raise RuntimeError(f"the job answered {len(numbers)} rows that are not rows 0..{len(numbers) - 1} once each")
    bits = np.concatenate(bpd)[order]
    kind = kinds.pop()
    columns = {name: np.concatenate(parts)[order] for name, parts in extra.items()}
    return Scores(np.concatenate(log_prob)[order], None if kind == "unnormalized" else bits, kind,
                  int(versions.pop()),
                  scores={k.removeprefix(SCORE_PREFIX): v for k, v in columns.items() if k.startswith(SCORE_PREFIX)},
                  percentiles={(LOG_PROB if k == PERCENTILE else k.removeprefix(PERCENTILE_PREFIX)): v
                               for k, v in columns.items() if k.startswith(PERCENTILE)})


# ---- sampling ----------------------------------------------------------------------------------------------

def sample_dataset(repo: str | Path, model: str, n: int, *, seed: int, temperature: float | None = None,
                   langevin_steps: int | None = None, langevin_step_size: float | None = None,
                   return_latents: bool = False, version: int = 0, concurrency: int = 1, blocks_per_batch: int = 16,
                   num_cpus: float = 1, settings: dict[str, Any] | None = None) -> ray.data.Dataset:
    """n samples of ``model`` drawn by ``concurrency`` Ray actors, equal to ``Client.sample(model, n,
    seed=seed)``: a lazy Dataset of the columns ``row``, ``x`` (the sample, float32 in the data domain),
    ``version`` and, with ``return_latents``, ``latents``. Each record of the job is one SampleStream block
    (256 rows, seeded ``derived_seed(seed, k)``); an actor takes ``blocks_per_batch`` blocks at a time."""
    if concurrency < 1 or blocks_per_batch < 1:
        raise ValueError(f"concurrency and blocks_per_batch must be >= 1, got {concurrency}, {blocks_per_batch}")
    count = len(block_rows(n))
    ids = np.arange(count, dtype=np.int64)
    # One Ray block per batch, so every actor gets work; from the driver: no reading task the actors can starve.
    blocks = ray.data.from_numpy(np.array_split(ids, -(-count // blocks_per_batch)))
    blocks.context.execution_options.preserve_order = True
    options = {"temperature": temperature, "langevin_steps": langevin_steps,
               "langevin_step_size": langevin_step_size, "return_latents": return_latents}
    return blocks.map_batches(
        BlockSampler, batch_size=blocks_per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
        fn_constructor_kwargs={"repo": str(repo), "model": model, "n": int(n), "seed": int(seed),
                               "options": options, "version": version, "settings": dict(settings or {})})


class BlockSampler:
    """A Ray actor's work in ``sample_dataset``: a LocalEngine, and the SampleStream blocks of each batch."""

    def __init__(self, repo: str, model: str, n: int, seed: int, options: dict[str, Any], version: int,
                 settings: dict[str, Any]) -> None:
        self.engine = LocalEngine(repo, models=[model], **settings)
        self.model, self.n, self.seed, self.options = model, n, seed, options
        self.version = self.engine.version(model, version)
        self.pool = ThreadPoolExecutor(SAMPLE_THREADS, thread_name_prefix="genserve-sample-block")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ks = [int(k) for k in batch["data"]]

        def block(k: int):
            rows = min(STREAM_BLOCK_ROWS, self.n - k * STREAM_BLOCK_ROWS)
            return self.engine.sample(self.model, rows, derived_seed(self.seed, k), version=self.version,
                                      **self.options)

        results = list(self.pool.map(block, ks))  # together, so their steps share the batcher's calls
        out = {ROW: np.concatenate([k * STREAM_BLOCK_ROWS + np.arange(len(r.x)) for k, r in zip(ks, results,
                                                                                                strict=True)]),
               SAMPLES: np.concatenate([r.x for r in results]),
               VERSION: np.full(sum(len(r.x) for r in results), self.version, np.int64)}
        if self.options["return_latents"]:
            if results[0].latents is None:
                raise ValueError(f"{self.model} has no latents to return; leave return_latents unset")
            out[LATENTS] = np.concatenate([r.latents for r in results])
        return out

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def collect_samples(sampled: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray | None]:
    """(samples (n, *shape), latents (n, q) or None) of a ``sample_dataset`` job on this machine, in order."""
    rows, xs, zs = [], [], []
    for batch in sampled.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch[ROW])
        xs.append(batch[SAMPLES])
        if LATENTS in batch:
            zs.append(batch[LATENTS])
    if not rows:
        raise ValueError("no samples were drawn")
    order = np.argsort(np.concatenate(rows), kind="stable")
    return np.concatenate(xs)[order], (np.concatenate(zs)[order] if zs else None)


def cpus() -> int:
    """CPUs of the connected Ray cluster (1 when it reports none)."""
    return max(1, math.floor(ray.cluster_resources().get("CPU", 1)))
