"""wmloc: white-matter lesion localization (Machnio, Nielsen, Ghazi, NLDL 2025), as a rerunnable book.

One module per step of the method:

- :mod:`wmloc_utils.fetch`    -- data directory, hashed registry and download of the JHU Eve atlas
- :mod:`wmloc_utils.images`   -- NIfTI loading/validation with clear errors, grid checks, atomic writes
- :mod:`wmloc_utils.subjects` -- subject discovery (WMH challenge, BIDS, CSV manifest) and loading
- :mod:`wmloc_utils.demo`     -- the built-in synthetic demo cohort
- :mod:`wmloc_utils.runtime`  -- seeds, device selection, printed configuration, work directory
- :mod:`wmloc_utils.figures`  -- nilearn and plotly figures used across the notebooks
- :mod:`wmloc_utils.book`     -- runs the notebooks in order with papermill
"""

__version__ = "0.1.0"
