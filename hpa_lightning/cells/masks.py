"""Cell and nucleus masks as files: label images (0 background, one id per cell), found, read, checked and written.

Masks circulate in several shapes: HPA-Cell-Segmentation and the 2021 teams wrote `{ID}_cell_mask.png` /
`{ID}_nuclei_mask.png` (uint16 PNG), others `{ID}.npz` / `.npy` (int32 arrays) or 16- / 32-bit TIFFs. All are read
here into one form, an int32 (H, W) label image, and written in one form, uint16 PNG (what the competition's masks
were), so a segmentation made elsewhere is used as if it had been made here.

Loading arrays never unpickles (`allow_pickle=False`), and an image header declaring more pixels than the caller's
bound is refused before decoding: a mask file may come from someone else.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hpa_lightning.errors import DataError
from hpa_lightning.files import atomic_path

MASK_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".npy", ".npz")
CELL_MASK_TAG, NUCLEI_MASK_TAG = "_cell_mask", "_nuclei_mask"
MAX_LABEL = np.iinfo(np.uint16).max  # the written form, uint16 PNG, holds ids up to 65535
DEFAULT_MAX_MASK_PIXELS = 16384 * 16384  # as data.max_image_pixels: masks are at the image's own size


def cell_mask_path(folder: Path, image_id: str) -> Path:
    return Path(folder) / f"{image_id}{CELL_MASK_TAG}.png"


def nuclei_mask_path(folder: Path, image_id: str) -> Path:
    return Path(folder) / f"{image_id}{NUCLEI_MASK_TAG}.png"


def find_cell_mask(folder: Path, image_id: str) -> Path | None:
    """The cell mask file of `image_id` in `folder`: `{ID}_cell_mask.*` first, then `{ID}.*` (MASK_SUFFIXES)."""
    folder = Path(folder)
    for stem in (f"{image_id}{CELL_MASK_TAG}", image_id):
        for suffix in MASK_SUFFIXES:
            for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _from_array(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise DataError(f"{path}: a mask is a 2-D label image; this one has shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: a mask holds integer cell ids; this one is {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > np.iinfo(np.int32).max):
        raise DataError(f"{path}: cell ids must be in 0..{np.iinfo(np.int32).max} (0 = background); found "
                        f"{int(array.min())}..{int(array.max())}")
    return array.astype(np.int32, copy=False)


def _read_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if len(names) != 1:
            raise DataError(f"{path}: expected one array in the archive, found {len(names)} ({', '.join(names)})")
        return archive[names[0]]


def _read_image(path: Path, max_pixels: int) -> np.ndarray:
    with Image.open(path) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise DataError(f"{path}: {width}x{height} px is above the bound of {max_pixels} px; refused before "
                            f"decoding")
        if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "1"):
            raise DataError(f"{path}: a mask is a greyscale label image (8, 16 or 32 bit); this one is mode "
                            f"{img.mode}")
        return np.asarray(img)


def read_label_image(path: Path, max_pixels: int = DEFAULT_MAX_MASK_PIXELS) -> np.ndarray:
    """A label image file (PNG, TIFF, NPY, NPZ) as int32 (H, W); one `DataError` line naming the file otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False, mmap_mode="r")
            if array.ndim >= 2 and int(np.prod(array.shape[-2:])) > max_pixels:
                raise DataError(f"{path}: {array.shape} is above the bound of {max_pixels} px")
            array = np.asarray(array)
        elif suffix == ".npz":
            array = _read_npz(path)
        else:
            array = _read_image(path, max_pixels)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, UnidentifiedImageError, zipfile.BadZipFile, SyntaxError,
            Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read the mask ({reason})") from None
    return _from_array(array, path)


def load_cell_mask(folder: Path, image_id: str, height: int, width: int,
                   max_pixels: int = DEFAULT_MAX_MASK_PIXELS) -> np.ndarray:
    """The cell mask of `image_id` (int32 (height, width)); `DataError` naming the file when it is missing, has
    another size than its image, or holds no cell."""
    path = find_cell_mask(folder, image_id)
    if path is None:
        raise DataError(f"{folder}: no cell mask for image {image_id} (expected {image_id}{CELL_MASK_TAG}.png or "
                        f"{image_id}.{{png,tif,npy,npz}})")
    labels = read_label_image(path, max_pixels)
    if labels.shape != (height, width):
        raise DataError(f"{path}: the mask is {labels.shape[1]}x{labels.shape[0]} px but its image is "
                        f"{width}x{height} px")
    if not labels.any():
        raise DataError(f"{path}: the mask holds no cell")
    return labels


def cell_ids(labels: np.ndarray) -> np.ndarray:
    """The ids of the cells in a label image, ascending, background (0) left out."""
    ids = np.unique(labels)
    return ids[ids > 0]


def write_label_png(path: Path, labels: np.ndarray) -> Path:
    """Write a label image as a uint16 PNG, atomically (a reader never sees half a mask)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or (labels.size and (labels.min() < 0 or labels.max() > MAX_LABEL)):
        raise ValueError(f"{path}: a label image is 2-D with ids in 0..{MAX_LABEL}")
    path = Path(path)
    with atomic_path(path, size=labels.nbytes) as tmp:
        Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG")
    return path


def write_masks(folder: Path, image_id: str, cells: np.ndarray, nuclei: np.ndarray) -> tuple[Path, Path]:
    """`{ID}_cell_mask.png` and `{ID}_nuclei_mask.png` in `folder`: one id per cell, its nucleus under the same id."""
    if cells.shape != nuclei.shape:
        raise ValueError(f"{image_id}: cell mask {cells.shape} and nuclei mask {nuclei.shape} differ in size")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return (write_label_png(cell_mask_path(folder, image_id), cells),
            write_label_png(nuclei_mask_path(folder, image_id), nuclei))
