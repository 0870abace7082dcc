"""Cell masks by HPA-Cell-Segmentation (CellProfiling's `hpacellseg`, the U-Nets the 2021 competition ran), when the
user has installed it and holds its two weight files.

    pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip

The package is not on the package registry and is never installed or imported unless asked for. Two of its habits
are refused here:

- its `CellSegmentator` downloads a weight file when the path it is given does not exist: a missing path is refused
  before the package is touched (this project never downloads);
- its weight files are whole pickled models (`torch.load(..., weights_only=False)`): loading one runs whatever code
  the file holds, so a file is loaded only when its resolved path is trusted by name (`trust_weights=PATH[,PATH]`),
  the way `trust=` names a `_target_` (hpa_lightning.targets). The models are loaded here, after that check, and
  handed to `CellSegmentator` as objects (its own `torch.load` would refuse them under torch >= 2.6 anyway).

Upstream's own code uses `np.bool` (removed in NumPy 1.24) and scikit-image's `multichannel=` (removed in 0.19); such a
failure is reported as one line saying so. Its masks come back at the image's size (its resize swaps width and height
for non-square images; the masks are brought back to the image's size nearest-neighbour either way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa_lightning.cells.segmentation import upsample_labels
from hpa_lightning.errors import DataError, UnsafeTargetError, UsageError

INSTALL = "pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip"
PACKAGE = "hpacellseg"


def trusted_paths(trust_weights: str) -> set[Path]:
    """The resolved paths named by `trust_weights` (comma-separated)."""
    return {Path(item.strip()).expanduser().resolve() for item in str(trust_weights or "").split(",") if item.strip()}


def check_weights(nuclei_model: str, cell_model: str, trust_weights: str) -> tuple[Path, Path]:
    """The two weight files as resolved paths, refused when not given, missing (upstream would download them) or not
    trusted by exact resolved path."""
    trusted = trusted_paths(trust_weights)
    paths = []
    for key, value in (("nuclei_model", nuclei_model), ("cell_model", cell_model)):
        if not value:
            raise UsageError(f"method=hpacellseg needs {key}=PATH, a local copy of its weight file (this command never "
                             f"downloads; the URLs are in hpacellseg/constants.py)")
        path = Path(str(value)).expanduser().resolve()
        if not path.is_file():
            raise DataError(f"{key}={value}: no such file; HPA-Cell-Segmentation would download it there, this command "
                            f"never downloads: fetch the weights yourself and give their local path")
        if path not in trusted:
            raise UnsafeTargetError(f"{key}={value}: an HPA-Cell-Segmentation weight file is a whole pickled model and "
                                    f"loading it runs code the file holds; load it only if you trust where it came "
                                    f"from, by naming it: trust_weights={path}")
        paths.append(path)
    return paths[0], paths[1]


def import_package() -> object:
    """`hpacellseg` (its cellsegmentator and utils modules loaded); one line saying how to install it otherwise."""
    try:
        package = importlib.import_module(PACKAGE)
        importlib.import_module(f"{PACKAGE}.cellsegmentator")
        importlib.import_module(f"{PACKAGE}.utils")
    except ImportError as err:
        raise UsageError(f"method=hpacellseg needs the HPA-Cell-Segmentation package, not installed here ({err}); "
                         f"install it with: {INSTALL}") from None
    return package


def _upstream(call: Callable[[], object], what: str) -> object:
    """Run an hpacellseg call; its known incompatibilities with today's NumPy / scikit-image become one line."""
    try:
        return call()
    except (AttributeError, TypeError) as err:
        text = str(err)
        if "bool" in text or "multichannel" in text:
            raise UsageError(f"hpacellseg {what} failed: {text.splitlines()[0]} (its code needs NumPy < 1.24 for "
                             f"np.bool and scikit-image < 0.19 for multichannel=; install those in its "
                             f"environment)") from None
        raise


@dataclass
class HpaCellSegmenter:
    """A loaded `CellSegmentator` and `label_cell`; call it with one image's channels."""

    segmentator: object
    label_cell: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

    def __call__(self, blue: np.ndarray, red: np.ndarray, yellow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cells, nuclei) int32 at the channels' size: a cell and its nucleus under one id, nuclei inside cells."""
        shape = np.shape(blue)
        nuclei_pred = _upstream(lambda: self.segmentator.pred_nuclei([blue])[0], "pred_nuclei")  # type: ignore[attr-defined]
        cell_pred = _upstream(lambda: self.segmentator.pred_cells([[red], [yellow], [blue]])[0],  # type: ignore[attr-defined]
                              "pred_cells")
        nuclei, cells = _upstream(lambda: self.label_cell(nuclei_pred, cell_pred), "label_cell")  # type: ignore[misc]
        cells, nuclei = (np.asarray(labels).astype(np.int32) for labels in (cells, nuclei))
        if cells.shape != shape:
            cells, nuclei = upsample_labels(cells, shape), upsample_labels(nuclei, shape)
        return cells, np.where(cells == nuclei, nuclei, 0).astype(np.int32)


def load_segmenter(nuclei_model: str, cell_model: str, trust_weights: str, scale: float = 0.25,
                   device: str = "auto") -> HpaCellSegmenter:
    """Check the weight paths and their trust, import hpacellseg, load both models (trusted: `weights_only=False`)
    and build its `CellSegmentator(scale_factor=scale, padding=True, multi_channel_model=True)`."""
    nuclei_path, cell_path = check_weights(nuclei_model, cell_model, trust_weights)
    package = import_package()
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = []
    for path in (nuclei_path, cell_path):
        try:
            model = torch.load(path, map_location=torch.device(device), weights_only=False)  # trusted above
        except Exception as err:  # any unpickling failure: a broken or foreign file
            reason = (str(err).splitlines() or [""])[0]
            raise DataError(f"{path}: cannot load the model ({type(err).__name__}: {reason})") from None
        if isinstance(model, torch.nn.DataParallel):
            model = model.module
        models.append(model)
    segmentator = package.cellsegmentator.CellSegmentator(  # type: ignore[attr-defined]
        nuclei_model=models[0], cell_model=models[1], scale_factor=scale, device=device, padding=True,
        multi_channel_model=True)
    return HpaCellSegmenter(segmentator=segmentator, label_cell=package.utils.label_cell)  # type: ignore[attr-defined]
