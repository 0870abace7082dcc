"""Classical cell segmentation of an HPA image with scikit-image: nuclei from the blue channel, cell bodies grown from
them over the red + yellow (cytoplasm) signal.

Works at a reduced scale (`scale=0.25`, as the 2021 teams ran HPA-Cell-Segmentation: a 2048 px image is segmented at
512 px) and returns label images at the image's own size (labels upsampled nearest-neighbour):

1. each channel reduced (block mean when 1 / scale is an integer, else an anti-aliased resize) and normalised by its
   own percentiles (any dtype: 8-bit, 16-bit low-range, float);
2. nuclei: the smoothed blue channel above its Otsu threshold, holes filled, touching nuclei split by a watershed
   on the distance transform seeded by its h-maxima, small objects dropped;
3. cells: a watershed on the smoothed red + yellow + blue signal seeded by the nuclei and limited to the foreground
   (that signal above a fraction of its Otsu threshold, nuclei included); cells below a minimum area are dropped with
   their nucleus, and foreground without a nucleus is left unlabelled (a cell without nucleus is dropped).

A cell and its nucleus share one id (1..n, 0 background); every nucleus lies inside its cell. Areas are in pixels of
the full-size image, so the parameters mean the same at any `scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation, transform


@dataclass(frozen=True)
class SegmentationParams:
    """Defaults fit HPA 2021 geometry (2048 px images, cells 200-400 px and nuclei 80-150 px across)."""

    scale: float = 0.25  # work at this fraction of the image size (0.25: 2048 px -> 512 px)
    low_percentile: float = 1.0  # each channel normalised so that these percentiles map to 0 and 1
    high_percentile: float = 99.5
    smooth_px: float = 4.0  # Gaussian sigma before thresholding, full-size px
    nucleus_threshold: float = 1.0  # x Otsu's threshold of the smoothed blue channel
    split_depth_px: float = 6.0  # h of the h-maxima of the nuclei distance transform: shallower necks do not split
    min_nucleus_area: float = 500.0  # full-size px (a 25 px disc: metaphase plates are thin); smaller is debris
    cell_threshold: float = 0.5  # x Otsu's threshold of the smoothed cytoplasm + nucleus signal: the foreground
    min_cell_area: float = 3000.0  # full-size px (a 62 px disc)

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale={self.scale}: expected 0 < scale <= 1")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError(f"percentiles {self.low_percentile}, {self.high_percentile}: expected 0 <= low < high "
                             f"<= 100")


def _factor(scale: float) -> int | None:
    """The integer reduction factor 1 / scale when it is one (block means then), else None."""
    inverse = 1.0 / scale
    return round(inverse) if abs(inverse - round(inverse)) < 1e-6 else None


def _reduce(channel: np.ndarray, scale: float) -> np.ndarray:
    """`channel` at `scale` as float32: the mean of each f x f block (edge blocks padded with their edge), or an
    anti-aliased linear resize when 1 / scale is not an integer."""
    factor = _factor(scale)
    image = np.asarray(channel)
    if factor == 1:
        return image.astype(np.float32)
    if factor is None:
        shape = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        return transform.resize(image.astype(np.float32), shape, order=1, anti_aliasing=True,
                                preserve_range=True).astype(np.float32)
    pad = [(0, -size % factor) for size in image.shape]
    if any(after for _, after in pad):
        image = np.pad(image, pad, mode="edge")
    return transform.downscale_local_mean(image, (factor, factor)).astype(np.float32)


def upsample_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour labels at `shape`: pixel (y, x) takes the reduced pixel whose area holds its centre."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _normalise(channel: np.ndarray, params: SegmentationParams) -> np.ndarray:
    low, high = np.percentile(channel, (params.low_percentile, params.high_percentile))
    if high <= low:
        return np.zeros_like(channel)
    return np.clip((channel - low) / (high - low), 0.0, 1.0, dtype=np.float32)


def _otsu(image: np.ndarray) -> float:
    return float(filters.threshold_otsu(image)) if image.max() > image.min() else math.inf


def segment_nuclei(blue: np.ndarray, params: SegmentationParams, px: float) -> np.ndarray:
    """Nuclei labels (int32) of a normalised, reduced blue channel; `px` is the size of one reduced pixel in
    full-size pixels (1 / scale)."""
    smooth = filters.gaussian(blue, sigma=params.smooth_px / px, preserve_range=True)
    binary = ndi.binary_fill_holes(smooth > params.nucleus_threshold * _otsu(smooth))
    binary = morphology.remove_small_objects(binary, max_size=int(params.min_nucleus_area / px**2))
    distance = ndi.distance_transform_edt(binary)
    objects = measure.label(binary)
    seeds = np.zeros(binary.shape, dtype=np.int32)
    count = 0
    for index, window in enumerate(ndi.find_objects(objects), start=1):
        # one seed per dome of the distance map deeper than split_depth: the regional maxima of its h-reconstruction
        # (connected plateaus, where skimage's h_maxima keeps only the top pixels, which ties can disconnect); an
        # object too thin for any dome becomes one plateau, its own seed. Per object, in its box: 6x faster.
        if window is None:
            continue
        inside = objects[window] == index
        dome = np.where(inside, distance[window], 0.0)
        peaks = morphology.local_maxima(morphology.reconstruction(dome - params.split_depth_px / px, dome)) & inside
        found, n = measure.label(peaks, return_num=True)
        seeds[window][peaks] = found[peaks] + count
        count += n
    nuclei = segmentation.watershed(-distance, seeds, mask=binary)
    return morphology.remove_small_objects(nuclei, max_size=int(params.min_nucleus_area / px**2)).astype(np.int32)


def segment_cells(nuclei: np.ndarray, signal: np.ndarray, params: SegmentationParams,
                  px: float) -> tuple[np.ndarray, np.ndarray]:
    """(cells, nuclei) with one id per cell 1..n: the watershed of the smoothed `signal` (cytoplasm + nucleus) from
    the nuclei, inside the foreground; small cells dropped with their nucleus."""
    smooth = filters.gaussian(signal, sigma=params.smooth_px / px, preserve_range=True)
    foreground = (smooth > params.cell_threshold * _otsu(smooth)) | (nuclei > 0)
    cells = segmentation.watershed(-smooth, nuclei, mask=foreground)
    cells = morphology.remove_small_objects(cells, max_size=int(params.min_cell_area / px**2))
    nuclei = np.where(cells == nuclei, nuclei, 0)  # a nucleus whose cell was dropped goes with it
    cells, forward, _ = segmentation.relabel_sequential(cells)
    return cells.astype(np.int32), forward[nuclei].astype(np.int32)


def segment_image(blue: np.ndarray, red: np.ndarray, yellow: np.ndarray,
                  params: SegmentationParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cells, nuclei): int32 label images at the size of the channels (any dtype, (H, W) each), 0 background, a
    cell and its nucleus under the same id; no cell found gives two all-zero images."""
    params = params or SegmentationParams()
    shape = np.shape(blue)
    if len(shape) != 2 or np.shape(red) != shape or np.shape(yellow) != shape:
        raise ValueError(f"blue, red and yellow must be 2-D images of one size; got {np.shape(blue)}, "
                         f"{np.shape(red)}, {np.shape(yellow)}")
    px = 1.0 / params.scale
    small_blue, small_red, small_yellow = (_normalise(_reduce(channel, params.scale), params)
                                           for channel in (blue, red, yellow))
    nuclei = segment_nuclei(small_blue, params, px)
    cells, nuclei = segment_cells(nuclei, small_red + small_yellow + small_blue, params, px)
    return upsample_labels(cells, shape), upsample_labels(nuclei, shape)
