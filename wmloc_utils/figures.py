"""Figures shared by the notebooks: plotly set-up for the book, and image overlay viewers.

Each plotly figure is output as the plotly mime type only (JupyterLab and VS Code draw it natively); the
book turns it into HTML without plotly.js at build time (:func:`figure_html`, used by
``wmloc_utils.site``), and every page loads plotly.js once, so the executed notebooks and the pages
stay light and work offline, no CDN. Image viewers send 8-bit slices (1 byte a voxel, not 4).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio


def setup_plotly() -> None:
    """Output figures as the plotly mime type (drawn by JupyterLab/VS Code; rendered by the book's build)."""
    pio.renderers.default = "plotly_mimetype"


def figure_html(figure: dict | go.Figure) -> str:
    """A figure as a ``<div>`` and its ``Plotly.newPlot`` script, relying on the page's plotly.js.

    No plotly.js (4.8 MB a figure with the ``notebook`` renderer) and no MathJax CDN script.
    """
    return pio.to_html(figure, include_plotlyjs=False, include_mathjax=False, full_html=False,
                       default_width="100%", default_height=525, validate=False)


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


def slice_viewer(background: nib.spatialimages.SpatialImage, overlay: nib.spatialimages.SpatialImage | None = None,
                 title: str = "", n_slices: int = 12, colorscale: str = "Reds", opacity: float = 0.5) -> go.Figure:
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
    zs = np.unique(np.linspace(nz * 0.2, nz * 0.85, n_slices).astype(int))
    fig = go.Figure()
    for i, z in enumerate(zs):
        fig.add_trace(go.Heatmap(z=bg[:, :, z].T, colorscale="Gray", zmin=0, zmax=255, showscale=False,
                                 visible=i == len(zs) // 2, hoverinfo="skip"))
        if ov is not None:
            fig.add_trace(go.Heatmap(z=ov[:, :, z].T, colorscale=transparent_zero(colorscale, ov_max + 1), zmin=0,
                                     zmax=ov_max, opacity=opacity, showscale=False, visible=i == len(zs) // 2,
                                     hovertemplate="%{z}<extra></extra>"))
    per = 2 if ov is not None else 1
    steps = []
    for i, z in enumerate(zs):
        vis = [False] * (len(zs) * per)
        vis[i * per:(i + 1) * per] = [True] * per
        steps.append(dict(method="update", args=[{"visible": vis}], label=str(int(z))))
    fig.update_layout(title=title, sliders=[dict(active=len(zs) // 2, steps=steps, currentvalue={"prefix": "axial slice "})],
                      width=520, height=560, margin=dict(l=10, r=10, t=40, b=10))
    fig.update_yaxes(scaleanchor="x", scaleratio=zooms[1] / zooms[0], showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    return fig
