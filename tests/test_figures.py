"""Figures live in :mod:`wmloc_utils.figures`: importing a step module loads no plotting library."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import wmloc_utils

DRAWING = ("figures", "site")  # the figures, and the book's build that renders them
STEPS = sorted(m.name for m in pkgutil.iter_modules(wmloc_utils.__path__) if m.name not in DRAWING)
PLOTTING = ("plotly", "matplotlib.pyplot")
# Third-party libraries that import matplotlib.pyplot themselves when imported (for their own plots).
LOAD_PYPLOT = ("ants", "monai")

# Imports every step module, then figures, in one fresh interpreter, and reports which plotting libraries
# each stage loaded and, for each library, the module that imported it first: the innermost frame outside
# importlib and the library itself (so a step that pulls plotly in through another step names that one).
_PROBE = """
import importlib, json, sys
PLOTTING, OWN = {plotting!r}, ("plotly", "matplotlib", "importlib")
importers = {{}}

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name in PLOTTING and name not in importers:
            frame = sys._getframe(1)
            while frame and (frame.f_code.co_filename.startswith("<frozen")
                             or frame.f_globals.get("__name__", "").split(".")[0] in OWN):
                frame = frame.f_back
            importers[name] = frame.f_globals.get("__name__", "?") if frame else "?"

sys.meta_path.insert(0, Probe())
for module in {steps!r}:
    importlib.import_module("wmloc_utils." + module)
steps = {{"loaded": [m for m in PLOTTING if m in sys.modules], "importers": dict(importers)}}
import wmloc_utils.figures
print(json.dumps({{"steps": steps, "figures": importers}}))
"""


def test_step_modules_import_no_plotting_library():
    """plotly never; matplotlib.pyplot only when ANTsPy or MONAI imports it (they do so on their own import)."""
    code = _PROBE.format(plotting=PLOTTING, steps=STEPS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    loaded, importers = probe["steps"]["loaded"], probe["steps"]["importers"]
    offenders = {
        lib: importers.get(lib)
        for lib in loaded
        if lib == "plotly" or importers.get(lib, "?").split(".")[0] not in LOAD_PYPLOT
    }
    assert not offenders, f"step modules that load a plotting library (its drawing belongs in figures.py): {offenders}"
    assert probe["figures"]["plotly"] == "wmloc_utils.figures"  # the probe sees who imports


def test_training_curves_draw_the_terms_a_history_has():
    import pandas as pd

    from wmloc_utils import figures

    history = pd.DataFrame(
        {"epoch": [1, 2], "loss": [1.0, 0.5], "ce": [0.6, 0.3], "dice": [0.4, 0.2], "val_dice": [0.3, 0.6]}
    )
    fig = figures.training_curves(history, "validation mean region Dice")
    assert [t.name for t in fig.data] == ["loss", "ce", "dice", "val_dice"]
    assert fig.layout.title.text == "Training loss terms and validation mean region Dice"


def test_lesion_overlay_outlines_the_reference_only_when_given():
    import matplotlib

    matplotlib.use("Agg")
    import nibabel as nib
    import numpy as np

    from wmloc_utils import figures

    flair = nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4))
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[8:12, 8:12, 6:14] = 1
    lesion = nib.Nifti1Image(mask, np.eye(4))
    with_ref = figures.lesion_overlay(lesion, flair, "001", reference=lesion)
    alone = figures.lesion_overlay(lesion, flair, "001")
    contours = [sum(len(ax.ax.collections) for ax in v.axes.values()) for v in (with_ref, alone)]
    assert contours[0] > contours[1]
    with_ref.close(), alone.close()
