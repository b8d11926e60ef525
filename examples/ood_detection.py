"""Out-of-distribution detection with genserve: score clean and corrupted digits through the server.

For every served model with a likelihood, the log-likelihood of each image is its anomaly score (lower = more
anomalous). In-distribution: the digits test split. Out-of-distribution: the same digits with 30% of pixels
replaced by random levels, inverted digits (16 - x), and uniform-noise images. Reports the AUROC per family and
shift, and draws ROC curves and score histograms.

    genserve quickstart                                   # trains and exports the seven models once
    python examples/ood_detection.py --repo quickstart/model_repository
    python examples/ood_detection.py --server localhost:8500 --out ood    # against a running server
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from genserve.clients.client import Client  # noqa: E402


def shifted_sets(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Three kinds of out-of-distribution images built from the clean test digits."""
    rng = np.random.default_rng(seed)
    corrupted = x.copy()
    mask = rng.random(x.shape) < 0.3
    corrupted[mask] = rng.integers(0, 17, size=int(mask.sum()))
    return {
        "corrupted 30%": corrupted.astype(np.float32),
        "inverted": (16 - x).astype(np.float32),
        "uniform noise": rng.integers(0, 17, size=x.shape).astype(np.float32),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", default="quickstart/model_repository", help="start a server on this repository")
    where.add_argument("--server", help="use a running server at HOST:PORT instead")
    p.add_argument("--out", default="ood", help="folder for ood_auroc.json and ood_detection.png")
    args = p.parse_args(argv)

    server = None
    if args.server:
        target = args.server
    else:
        from genserve.server.app import BackgroundServer
        from genserve.server.config import ServerConfig

        server = BackgroundServer(ServerConfig(repo=Path(args.repo), port=0, metrics_port=0))
        target = f"127.0.0.1:{server.port}"
    x_in = load_digits().images[1350:].astype(np.float32)  # the test split
    shifts = shifted_sets(x_in)
    results: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    scores_in: dict[str, np.ndarray] = {}
    try:
        with Client(target, timeout=300) as client:
            models = [m for m in client.models() if "log_likelihood" in m.operations and m.state == "READY"
                      and client.info(m.name).spec.shape == (8, 8)]
            for m in models:
                ll_in = client.log_likelihood(m.name, x_in, seed=0).log_prob
                scores_in[m.name] = ll_in
                results[m.name], curves[m.name] = {}, {}
                for shift, x_out in shifts.items():
                    ll_out = client.log_likelihood(m.name, x_out, seed=0).log_prob
                    # Outliers are the positive class; a lower log-likelihood means more anomalous.
                    y = np.r_[np.zeros(len(ll_in)), np.ones(len(ll_out))]
                    s = -np.r_[ll_in, ll_out]
                    results[m.name][shift] = float(roc_auc_score(y, s))
                    fpr, tpr, _ = roc_curve(y, s)
                    curves[m.name][shift] = (fpr, tpr)
                    if shift == "corrupted 30%":
                        scores_in[m.name + " corrupted"] = ll_out
    finally:
        if server is not None:
            server.stop()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood_auroc.json").write_text(json.dumps(results, indent=2))
    names = list(results)
    print("| model | " + " | ".join(shifts) + " |")
    print("|---|" + "---|" * len(shifts))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[name][s]:.3f}" for s in shifts) + " |")

    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.4), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[0, i]
        for shift, (fpr, tpr) in curves[name].items():
            ax.plot(fpr, tpr, label=f"{shift} ({results[name][shift]:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=6, loc="lower right")
        ax = axes[1, i]
        both = np.r_[scores_in[name], scores_in[name + " corrupted"]]
        bins = np.linspace(np.percentile(both, 1), np.percentile(both, 99), 40)
        ax.hist(scores_in[name], bins=bins, alpha=0.6, label="clean test digits")
        ax.hist(scores_in[name + " corrupted"], bins=bins, alpha=0.6, label="30% corrupted")
        ax.set_xlabel("log p(x) (nats)")
        ax.legend(fontsize=6)
    fig.suptitle("Out-of-distribution detection by log-likelihood (AUROC in brackets)")
    fig.tight_layout()
    fig.savefig(out / "ood_detection.png", dpi=110)
    print(f"wrote {out / 'ood_auroc.json'} and {out / 'ood_detection.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
