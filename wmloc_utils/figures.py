"""Every figure of the book: plotly set-up, image viewers with a slice slider, and the charts of the steps.

The step modules compute and this one draws: none of them imports a plotting library. Each
plotly figure is output as the plotly mime type only (JupyterLab and VS Code draw it natively); the
book turns it into HTML without plotly.js at build time (:func:`figure_html`, used by
``wmloc_utils.site``), and every page loads plotly.js once, so the executed notebooks and the pages
stay light and work offline, no CDN. Image viewers send 8-bit slices (1 byte a voxel, not 4).
"""

from __future__ import annotations

from collections.abc import Iterable

import nibabel as nib
import numpy as np
import pandas as pd
import plotly.colors
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio

from .localization import load_image


# ---------------------------------------------------------------- set-up
def setup_plotly() -> None:
    """Output figures as the plotly mime type (drawn by JupyterLab/VS Code; rendered by the book's build)."""
    pio.renderers.default = "plotly_mimetype"


def figure_html(figure: dict | go.Figure) -> str:
    """A figure as a ``<div>`` and its ``Plotly.newPlot`` script, relying on the page's plotly.js.

    No plotly.js (4.8 MB a figure with the ``notebook`` renderer) and no MathJax CDN script.
    """
    return pio.to_html(
        figure,
        include_plotlyjs=False,
        include_mathjax=False,
        full_html=False,
        default_width="100%",
        default_height=525,
        validate=False,
    )


# ---------------------------------------------------------------- image viewers
def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` windowed to [lo, hi] as grey levels 0..255: a quarter of float32's bytes in a figure."""
    scaled = (np.asarray(values, dtype=np.float32) - lo) / max(hi - lo, 1e-12) * 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def transparent_zero(colorscale: str, levels: int = 256) -> list:
    """``colorscale`` with the first of ``levels`` steps (value 0) fully transparent: an overlay's background."""
    scale = plotly.colors.get_colorscale(colorscale)
    edge = 1 / levels
    clear = "rgba(0,0,0,0)"
    first = plotly.colors.sample_colorscale(scale, [edge])[0]
    return [[0.0, clear], [edge, clear], [edge, first], *[[float(v), c] for v, c in scale if v > edge]]


def _axial_stack(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient to RAS and return the array with its voxel sizes, so every subject is shown the same way round."""
    ras = nib.as_closest_canonical(img)
    return np.asanyarray(ras.dataobj).astype(np.float32), tuple(float(z) for z in ras.header.get_zooms()[:3])


def _slice_slider(slices: dict[int, list[dict]], prefix: str) -> go.Figure:
    """Heatmaps shown one axial slice at a time (the middle one first), with a slider to pick the slice.

    ``slices`` maps each slice number to the settings of its heatmaps (drawn in order, the first below).
    """
    mid = len(slices) // 2
    fig = go.Figure()
    for i, traces in enumerate(slices.values()):
        for trace in traces:
            fig.add_trace(go.Heatmap(**trace, visible=i == mid))
    per = len(fig.data) // len(slices)
    steps = [
        dict(method="update", args=[{"visible": [j // per == i for j in range(len(fig.data))]}], label=str(int(z)))
        for i, z in enumerate(slices)
    ]
    fig.update_layout(sliders=[dict(active=mid, steps=steps, currentvalue={"prefix": prefix})])
    return fig


def slice_viewer(
    background: nib.spatialimages.SpatialImage,
    overlay: nib.spatialimages.SpatialImage | None = None,
    title: str = "",
    n_slices: int = 12,
    colorscale: str = "Reds",
    opacity: float = 0.5,
) -> go.Figure:
    """An interactive axial viewer: background image with an optional overlay and a slice slider.

    Both images must share a grid; they are reoriented to RAS so left is on the left of the screen
    (neurological convention) and the aspect ratio follows the true voxel size. The overlay's zeros
    are transparent; labels 1..255 are shown as they are, other values scaled to 0..255 of their maximum.
    """
    bg, zooms = _axial_stack(background)
    ov = _axial_stack(overlay)[0] if overlay is not None else None
    nz = bg.shape[2]
    lo, hi = np.percentile(bg[bg > 0], [1, 99]) if np.any(bg > 0) else (0.0, 1.0)
    bg = to_uint8(bg, lo, hi)
    if ov is not None:
        labels = np.all(ov == np.rint(ov)) and ov.min() >= 0 and ov.max() <= 255
        top = float(ov.max()) if labels else float(ov.max() or 1.0)
        ov = ov.astype(np.uint8) if labels else to_uint8(ov, 0.0, top)
        ov_max = max(int(ov.max()), 1)
    slices = {}
    for z in np.unique(np.linspace(nz * 0.2, nz * 0.85, n_slices).astype(int)):
        slices[z] = [dict(z=bg[:, :, z].T, colorscale="Gray", zmin=0, zmax=255, showscale=False, hoverinfo="skip")]
        if ov is not None:
            slices[z].append(
                dict(
                    z=ov[:, :, z].T,
                    colorscale=transparent_zero(colorscale, ov_max + 1),
                    zmin=0,
                    zmax=ov_max,
                    opacity=opacity,
                    showscale=False,
                    hovertemplate="%{z}<extra></extra>",
                )
            )
    fig = _slice_slider(slices, "axial slice ")
    fig.update_layout(title=title, width=520, height=560, margin=dict(l=10, r=10, t=40, b=10))
    fig.update_yaxes(scaleanchor="x", scaleratio=zooms[1] / zooms[0], showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    return fig


def training_curves(history: pd.DataFrame, what: str = "validation Dice") -> go.Figure:
    """Loss terms and validation score per epoch of a training run (``training.train``'s history)."""
    terms = [c for c in ("loss", "ce", "dice", "skeleton", "val_dice") if c in history]
    return px.line(history, x="epoch", y=terms, markers=True, title=f"Training loss terms and {what}")


def label_colormap(table: pd.DataFrame):
    """A matplotlib colormap with one colour per label id 0..max (table columns id, r, g, b), for nilearn."""
    from matplotlib.colors import ListedColormap

    colours = np.zeros((int(table["id"].max()) + 1, 3))
    colours[table["id"].to_numpy()] = table[["r", "g", "b"]].to_numpy() / 255.0
    return ListedColormap(colours)


def lesion_overlay(predicted, flair, subject: str, reference=None):
    """Predicted lesions (red) on the FLAIR in six axial slices, the reference's outline (blue) when given."""
    from nilearn import plotting

    title = f"subject {subject}: predicted WMH (red)" + (", reference (blue)" if reference is not None else "")
    view = plotting.plot_roi(
        predicted, bg_img=flair, cmap="autumn", display_mode="z", cut_coords=6, draw_cross=False, title=title
    )
    if reference is not None:
        view.add_contours(reference, levels=[0.5], colors="b", linewidths=0.8)
    return view


def plot_labels_nilearn(
    img: nib.spatialimages.SpatialImage,
    table: pd.DataFrame,
    bg_img: nib.spatialimages.SpatialImage | None = None,
    **kwargs,
):
    """``nilearn.plotting.plot_roi`` of a label map with the table's own colours (ids map exactly to colours)."""
    from nilearn import plotting

    n = int(table["id"].max())
    kwargs.setdefault("colorbar", False)
    kwargs.setdefault("black_bg", False)
    return plotting.plot_roi(img, bg_img=bg_img, cmap=label_colormap(table), vmin=0, vmax=n, alpha=0.8, **kwargs)


def plot_labels_plotly(
    img: nib.spatialimages.SpatialImage,
    table: pd.DataFrame,
    bg_img: nib.spatialimages.SpatialImage | None = None,
    n_slices: int = 10,
    max_size: int = 110,
    title: str = "",
    name_column: str = "short",
) -> go.Figure:
    """An interactive axial viewer of a label map: table colours, a slice slider, region names on the colour bar.

    ``table`` needs columns id, ``name_column`` and r, g, b (as :func:`wmloc_utils.atlas.regions_table`).
    Images are shown in RAS (left on the left) with the true voxel aspect; slices are subsampled to at
    most ``max_size`` voxels a side to keep the notebook small. ``bg_img`` (same grid) is drawn in grey.
    """
    ras = nib.as_closest_canonical(img)
    labels = np.rint(np.asanyarray(ras.dataobj)).astype(np.int64)
    zooms = np.array(ras.header.get_zooms()[:3], dtype=float)
    bg = None
    if bg_img is not None:  # grey levels 0..255 (integers keep the embedded figure small)
        bg = _axial_stack(bg_img)[0]
        bg = to_uint8(bg, 0.0, np.percentile(bg[bg > 0], 99) if np.any(bg > 0) else 1.0)
    step = max(1, int(np.ceil(max(labels.shape[:2]) / max_size)))
    ids = table["id"].to_numpy()
    n = int(max(ids.max(), labels.max()))
    colours = {int(r.id): f"rgb({r.r},{r.g},{r.b})" for r in table.itertuples()}
    scale = []
    for k in range(n + 1):  # stepped colour scale: value k (normalised) -> colour of id k; 0 transparent
        c = "rgba(0,0,0,0)" if k == 0 else colours.get(k, "rgb(0,0,0)")
        scale += [[k / (n + 1), c], [(k + 1) / (n + 1), c]]
    # Region names on the colour bar (a name per voxel as hover text would weigh a megabyte a figure)
    named = table[table["id"] > 0].sort_values("id")
    colorbar = (
        dict(
            tickvals=named["id"].tolist(),
            ticktext=named[name_column].astype(str).tolist(),
            tickfont=dict(size=8),
            len=1.0,
            thickness=12,
        )
        if len(named) <= 60
        else None
    )
    labels = labels.astype(np.uint8) if n <= 255 else labels.astype(np.uint16)
    nz = np.flatnonzero(labels.any(axis=(0, 1)))
    zs = (
        np.unique(np.linspace(nz.min(), nz.max(), n_slices + 2)[1:-1].astype(int))
        if nz.size
        else [labels.shape[2] // 2]
    )
    x = np.arange(0, labels.shape[0], step) * zooms[0]
    y = np.arange(0, labels.shape[1], step) * zooms[1]
    slices = {}
    for z in zs:
        slices[z] = (
            []
            if bg is None
            else [
                dict(
                    x=x,
                    y=y,
                    z=bg[::step, ::step, z].T,
                    colorscale="Gray",
                    zmin=0,
                    zmax=255,
                    showscale=False,
                    hoverinfo="skip",
                )
            ]
        )
        slices[z].append(
            dict(
                x=x,
                y=y,
                z=labels[::step, ::step, z].T,
                colorscale=scale,
                zmin=-0.5,
                zmax=n + 0.5,
                showscale=colorbar is not None,
                colorbar=colorbar,
                opacity=0.75 if bg is not None else 1.0,
                hovertemplate="id %{z}<extra></extra>",
            )
        )
    fig = _slice_slider(slices, "axial slice (RAS) ")
    fig.update_layout(title=title, width=560, height=600, margin=dict(l=10, r=10, t=40, b=10), plot_bgcolor="black")
    fig.update_yaxes(scaleanchor="x", scaleratio=1, showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    return fig


def brain_figure(
    regions_img, loads: pd.DataFrame, value: str = "lesion_ml", bg_img=None, title: str | None = None, **kwargs
):
    """Region loads painted on the brain (nilearn ``plot_stat_map``): each region shows its ``value``."""
    from nilearn import plotting

    img = load_image(regions_img, loads.set_index("region")[value])
    options = dict(
        display_mode="ortho",
        cmap="hot",
        symmetric_cbar=False,
        vmin=0,
        threshold=1e-9,
        black_bg=True,
        draw_cross=False,
        colorbar=True,
    )
    options.update(kwargs)
    return plotting.plot_stat_map(img, bg_img=bg_img, title=title, **options)


# ---------------------------------------------------------------- regional loads (notebook 07)
def bar_figure(
    tidy: pd.DataFrame, subject: str | None = None, value: str = "lesion_ml", table: pd.DataFrame | None = None
) -> go.Figure:
    """Bar chart of one subject's ``value`` per region (region colours from the table's r, g, b when given)."""
    rows = tidy if subject is None else tidy[tidy["subject"].astype(str) == str(subject)]
    rows = rows.sort_values("region")
    colors = None
    if table is not None and {"r", "g", "b"} <= set(table.columns):
        rgb = {int(t.id): f"rgb({t.r},{t.g},{t.b})" for t in table.itertuples()}
        colors = [rgb.get(int(i), "lightgrey") if i != 0 else "lightgrey" for i in rows["region"]]
    fig = go.Figure(
        go.Bar(
            x=rows["short"],
            y=rows[value],
            marker_color=colors,
            customdata=rows[["region", "n_lesions", "name"]],
            hovertemplate="%{customdata[2]} (id %{customdata[0]})<br>"
            + value
            + " %{y:.3g}<br>%{customdata[1]} lesions<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"{value} per region" + (f", subject {subject}" if subject is not None else ""),
        xaxis_title="region",
        yaxis_title=value,
        xaxis_tickangle=-60,
        height=450,
    )
    return fig


def cohort_heatmap(wide: pd.DataFrame, title: str = "Regional lesion load", label: str = "mL") -> go.Figure:
    """Interactive heatmap of a subjects x regions matrix (hover shows subject, region and value).

    Only numeric columns are drawn (a cohort table's ``status`` and ``error`` are not regions).
    """
    fig = px.imshow(
        wide.select_dtypes("number").astype(float),
        aspect="auto",
        color_continuous_scale="Inferno",
        labels=dict(x="region", y="subject", color=label),
        title=title,
    )
    fig.update_xaxes(tickangle=-60)
    fig.update_layout(height=max(350, 18 * len(wide) + 200))
    return fig


# ---------------------------------------------------------------- clusters (notebook 08)
def embedding_figure(
    emb: pd.DataFrame, color: pd.Series | Iterable, title: str = "", color_name: str = "cluster"
) -> go.Figure:
    """Scatter of a 2D embedding, one point per subject, coloured by cluster or known group."""
    data = emb.assign(**{color_name: [str(c) for c in color]}, subject=[str(i) for i in emb.index])
    fig = px.scatter(
        data,
        x="dim1",
        y="dim2",
        color=color_name,
        hover_name="subject",
        title=title,
        category_orders={color_name: sorted(data[color_name].unique())},
    )
    fig.update_traces(marker=dict(size=10, line=dict(width=1, color="white")))
    fig.update_layout(height=450)
    return fig


def profile_heatmap(
    profile: pd.DataFrame, title: str = "Mean regional load per cluster", label: str = "mL"
) -> go.Figure:
    """Heatmap of a :func:`wmloc_utils.clustering.profiles` table (rows: clusters with their size)."""
    values = profile.drop(columns="n")
    rows = [f"cluster {c} (n={n})" for c, n in zip(profile.index, profile["n"])]
    fig = px.imshow(
        values.to_numpy(),
        x=list(values.columns),
        y=rows,
        aspect="auto",
        color_continuous_scale="Inferno",
        labels=dict(x="region", y="", color=label),
        title=title,
    )
    fig.update_xaxes(tickangle=-60)
    fig.update_layout(height=250 + 40 * len(rows))
    return fig


def k_curve(table: pd.DataFrame, title: str = "Choosing the number of clusters") -> go.Figure:
    """Silhouette (and BIC, on a second axis) against k, with the chosen k marked."""
    fig = go.Figure(go.Scatter(x=table["k"], y=table["silhouette"], mode="lines+markers", name="silhouette"))
    if "bic" in table.columns:
        fig.add_trace(go.Scatter(x=table["k"], y=table["bic"], mode="lines+markers", name="BIC", yaxis="y2"))
        fig.update_layout(yaxis2=dict(title="BIC", overlaying="y", side="right"))
    chosen = table.loc[table["chosen"], "k"]
    for k in chosen:
        fig.add_vline(x=k, line_dash="dash", annotation_text=f"chosen k={k}")
    fig.update_layout(title=title, xaxis_title="k", yaxis_title="silhouette", height=400)
    return fig
