"""wmloc: white-matter lesion localization (Machnio, Nielsen, Ghazi, NLDL 2025), as a rerunnable book.

One module per step of the method, in the order the notebooks use them, and the modules they share:

- :mod:`wmloc_utils.fetch`        -- data directory, hashed registry and download of the JHU Eve atlas
- :mod:`wmloc_utils.errors`       -- :class:`~wmloc_utils.errors.InputError`, raised for input that cannot be used
- :mod:`wmloc_utils.images`       -- NIfTI loading/validation with clear errors, grid checks, atomic writes
- :mod:`wmloc_utils.subjects`     -- subject discovery (WMH challenge, BIDS, CSV manifest) and validation
- :mod:`wmloc_utils.demo`         -- the built-in synthetic demo cohort, with its truth
- :mod:`wmloc_utils.demo_truth`   -- the demo subjects' true regions, and the region step scored against them
- :mod:`wmloc_utils.atlas`        -- the Eve atlas, its LUT and the refined 34 + 2 region map
- :mod:`wmloc_utils.wmdepth`      -- periventricular/deep WM and the bullseye parcellation
- :mod:`wmloc_utils.antsio`       -- ANTsPy glue: nibabel <-> ANTs images, seeding, scratch files
- :mod:`wmloc_utils.tissue`       -- brain extraction and tissue segmentation (ANTsPy)
- :mod:`wmloc_utils.registration` -- atlas-to-subject registration and label propagation (ANTsPy)
- :mod:`wmloc_utils.authors_labels` -- the paper authors' published region maps of the challenge subjects
- :mod:`wmloc_utils.cluster`      -- where the per-subject steps run: processes, a local Dask cluster, SLURM
- :mod:`wmloc_utils.provenance`   -- fingerprints of inputs and outputs, so unchanged steps are not redone
- :mod:`wmloc_utils.networks`     -- segmentation networks (MONAI) and the training loss
- :mod:`wmloc_utils.multiresunet` -- the 3D MultiResUNet (Ibtehaz and Rahman 2020) from MONAI blocks
- :mod:`wmloc_utils.checkpoints`  -- checkpoint writing and safe loading, and the preprocessing a checkpoint rebuilds
- :mod:`wmloc_utils.training`     -- data pipeline and augmentation, training loop (one process or torchrun), split
- :mod:`wmloc_utils.inference`    -- whole-volume prediction on each subject's native FLAIR grid
- :mod:`wmloc_utils.metrics`      -- the MICCAI 2017 WMH challenge metrics and region Dice
- :mod:`wmloc_utils.localization` -- regional lesion loads per subject and cohort
- :mod:`wmloc_utils.lesion_classes` -- lesions classed by location (periventricular, juxtacortical, ...)
- :mod:`wmloc_utils.clustering`   -- clustering subjects by lesion pattern, stability, associations
- :mod:`wmloc_utils.apply`        -- the whole method on a new cohort (``wmloc-apply``)
- :mod:`wmloc_utils.results`      -- the paper's result tables, from what a book run left in its work directory
- :mod:`wmloc_utils.artefacts`    -- every file a notebook hands on in the work directory, named once
- :mod:`wmloc_utils.runtime`      -- a notebook's set-up in one call (start): work directory, seed, device, printed configuration
- :mod:`wmloc_utils.figures`      -- every figure: plotly set-up, slice viewers, charts (the steps draw nothing)
- :mod:`wmloc_utils.book`         -- runs the notebooks in order with papermill
- :mod:`wmloc_utils.site`         -- publishing the book: plotly.js once for the site, checks of the built pages
"""

import os as _os

__version__ = "0.1.0"

#: ITK threads of every ANTs call. Multi-threaded ANTs is not repeatable even with a seed: with 2 threads
#: a head's brain-mask registration gave another mask on every call (34 voxels apart), with 1 thread the
#: same bytes every time. ITK reads this once, at its first filter, so wmloc must be imported before any
#: ANTs call; subjects run in parallel processes instead (``n_jobs``). ``WMLOC_ITK_THREADS`` overrides it.
ITK_THREADS = _os.environ.get("WMLOC_ITK_THREADS", "1")
_os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = ITK_THREADS
