"""Pictures of samples: a PNG grid for image data, a scatter over the test data for 2-D rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genserve.core.spec import DataSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and safe in threads and CI
    import matplotlib.pyplot as plt

    return plt


GUTTER = "#4060a0"
"""Colour of the gaps between tiles (NaN pixels): coloured gutters keep neighbouring images apart."""


def _tiles(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) images tiled ``columns`` to a row on a NaN canvas (NaN: the gutters, drawn in
    GUTTER)."""
    rows = max(1, -(-len(images) // columns))
    h, w = images.shape[1:3]
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, *images.shape[3:]), np.nan,
                     dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = img
    return canvas


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grid(samples: np.ndarray, spec: DataSpec, path: str | Path, title: str = "",
                columns: int = 10) -> Path:
    """Write up to columns^2 images (N, H, W) as a gray grid (level 0 black, the top level white), or
    channels-last RGB images (N, H, W, 3) in colour; returns the path."""
    plt = _pyplot()
    x = np.asarray(samples, dtype=np.float32)[: columns * columns]
    if x.ndim == 4:  # channels-last: one channel is grey, three are RGB, otherwise the channels' mean in grey
        x = x[..., :3] if x.shape[-1] in (3, 4) else x.mean(-1)
    rows = max(1, -(-len(x) // columns))
    canvas = _tiles(x, columns)
    vmax = spec.levels - 1 if spec.discrete else float(np.nanmax(canvas)) if len(x) else 1.0
    vmin = 0.0 if spec.discrete else float(np.nanmin(canvas)) if len(x) else 0.0
    cmap = plt.get_cmap("gray").with_extremes(bad=GUTTER)
    fig, ax = plt.subplots(figsize=(0.55 * columns + 0.4, 0.55 * rows + 0.8), dpi=100)
    if canvas.ndim == 3:  # RGB in [0, 1], gutters painted in GUTTER
        import matplotlib.colors

        rgb = np.clip((canvas - vmin) / max(vmax - vmin, 1e-12), 0, 1)
        rgb[np.isnan(canvas).any(-1)] = matplotlib.colors.to_rgb(GUTTER)
        ax.imshow(rgb, interpolation="nearest")
    else:
        ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def sample_scatter(samples: np.ndarray, reference: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Write a scatter of 2-D samples (N, 2) over the reference (test) rows (M, 2); returns the path."""
    plt = _pyplot()
    s, r = np.asarray(samples, dtype=np.float32), np.asarray(reference, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    ax.scatter(r[:, 0], r[:, 1], s=4, c="#999999", alpha=0.6, label=f"test data ({len(r)})")
    ax.scatter(s[:, 0], s[:, 1], s=4, c="#d04020", alpha=0.6, label=f"samples ({len(s)})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def plot_samples(samples: np.ndarray, spec: DataSpec, reference: np.ndarray, path: str | Path,
                 title: str = "") -> Path | None:
    """The picture that fits the data: a grid for images, a scatter for 2-D rows, None otherwise."""
    if spec.is_image:
        return sample_grid(samples, spec, path, title)
    if spec.shape == (2,):
        return sample_scatter(samples, reference, path, title)
    return None


def family_rows(samples: dict[str, np.ndarray], levels: int, path: str | Path, title: str = "",
                columns: int = 16) -> Path:
    """One labelled row of ``columns`` samples (N, H, W) per model, grey levels 0..levels-1; returns the path.

    The quickstart's picture of every family at once: the same seed for each, names on the left."""
    plt = _pyplot()
    names = list(samples)
    fig, axes = plt.subplots(len(names), 1, figsize=(0.5 * columns + 1.4, 0.62 * len(names) + 0.5), dpi=100,
                             squeeze=False)
    cmap = plt.get_cmap("gray").with_extremes(bad=GUTTER)
    for ax, name in zip(axes[:, 0], names, strict=True):
        strip = _tiles(np.asarray(samples[name], dtype=np.float32)[:columns], columns)
        ax.imshow(np.ma.masked_invalid(strip), cmap=cmap, vmin=0, vmax=levels - 1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
        for side in ax.spines.values():
            side.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)
