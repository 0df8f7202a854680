"""Figures shared by the notebooks: plotly set-up for the book, and image overlay viewers.

Each plotly figure is output as the plotly mime type (JupyterLab and VS Code draw it natively) and as
HTML without plotly.js or MathJax (what the book renders): the site loads plotly.js once for every
page (``wmloc_utils.site``), so the executed notebooks and the HTML book stay light, offline, no CDN.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import HtmlRenderer

BOOK_RENDERER = "wmloc_book"


class BookHtmlRenderer(HtmlRenderer):
    """A figure as a ``<div>`` and its ``Plotly.newPlot`` script, relying on the page's plotly.js.

    No plotly.js (4.8 MB a figure with the ``notebook`` renderer), no MathJax CDN script, and none of the
    classic-notebook clean-up script: the book's pages load plotly.js once from ``_static``.
    """

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        """The ``text/html`` output of one figure."""
        html = pio.to_html(fig_dict, config=self.config, auto_play=self.auto_play, include_plotlyjs=False,
                           include_mathjax=False, full_html=False, animation_opts=self.animation_opts,
                           default_width="100%", default_height=525, validate=False)
        return {"text/html": html}


def setup_plotly() -> None:
    """Output figures as the plotly mime type plus light HTML (no plotly.js inside), for notebooks and the book."""
    pio.renderers[BOOK_RENDERER] = BookHtmlRenderer()
    pio.renderers.default = f"plotly_mimetype+{BOOK_RENDERER}"


def _axial_stack(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient to RAS and return the array with its voxel sizes, so every subject is shown the same way round."""
    ras = nib.as_closest_canonical(img)
    return np.asanyarray(ras.dataobj).astype(np.float32), tuple(float(z) for z in ras.header.get_zooms()[:3])


def slice_viewer(background: nib.spatialimages.SpatialImage, overlay: nib.spatialimages.SpatialImage | None = None,
                 title: str = "", n_slices: int = 12, colorscale: str = "Reds", opacity: float = 0.5,
                 overlay_names: dict[int, str] | None = None) -> go.Figure:
    """An interactive axial viewer: background image with an optional label overlay and a slice slider.

    Both images must share a grid; they are reoriented to RAS so left is on the left of the screen
    (neurological convention) and the aspect ratio follows the true voxel size.
    """
    bg, zooms = _axial_stack(background)
    ov = _axial_stack(overlay)[0] if overlay is not None else None
    nz = bg.shape[2]
    lo, hi = np.percentile(bg[bg > 0], [1, 99]) if np.any(bg > 0) else (0.0, 1.0)
    zs = np.unique(np.linspace(nz * 0.2, nz * 0.85, n_slices).astype(int))
    fig = go.Figure()
    for i, z in enumerate(zs):
        fig.add_trace(go.Heatmap(z=bg[:, :, z].T, colorscale="Gray", zmin=lo, zmax=hi, showscale=False,
                                 visible=i == len(zs) // 2, hoverinfo="skip"))
        if ov is not None:
            sl = ov[:, :, z].T.copy()
            sl[sl == 0] = np.nan
            text = None
            if overlay_names:
                text = np.vectorize(lambda v: overlay_names.get(int(v), "") if np.isfinite(v) else "")(sl)
            fig.add_trace(go.Heatmap(z=sl, colorscale=colorscale, opacity=opacity, showscale=False,
                                     visible=i == len(zs) // 2, text=text,
                                     hovertemplate="%{text}<extra></extra>" if text is not None else None))
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
