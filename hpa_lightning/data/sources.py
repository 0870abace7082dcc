"""Reading a dataset in a Kaggle HPA layout: `train.csv` plus `{Id}_{red,green,blue,yellow}.*`.

Label CSVs come in two layouts: Kaggle 2018's `Id,Target` (space-separated class ids) and HPA 2021's `ID,Label`
(`|`-separated); either holds ids of the run's class set (`data.classes`, hpa_lightning.classes).

Every problem is reported as a `DataError` whose message is one line naming the file, row or key at fault.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from hpa_lightning.classes import CHANNELS, HPA2018, ClassSet
from hpa_lightning.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelLayout:
    """The columns of a label CSV and how its labels are separated."""

    name: str
    id_column: str
    label_column: str
    separator: str | None  # None: whitespace

    def describe(self) -> str:
        return f"{self.id_column},{self.label_column}"


LABEL_LAYOUTS = (LabelLayout("Kaggle 2018", "Id", "Target", None), LabelLayout("HPA 2021", "ID", "Label", "|"))


@dataclass(frozen=True)
class LabelTable:
    ids: list[str]
    targets: list[str]  # the original label strings, kept for round-tripping
    labels: np.ndarray  # (N, number of classes) uint8 multi-hot
    layout: LabelLayout = LABEL_LAYOUTS[0]

    def __len__(self) -> int:
        return len(self.ids)


def parse_target(target: object, where: str, num_classes: int = len(HPA2018),
                 layout: LabelLayout = LABEL_LAYOUTS[0]) -> list[int]:
    column = layout.label_column
    if not isinstance(target, str) or not target.strip():
        raise DataError(f"{where}: empty {column}")
    other = "|" if layout.separator is None else " "
    tokens = target.split(layout.separator)
    if other in target.strip() and any(other in token.strip() or not token.strip() for token in tokens):
        wanted = "spaces" if layout.separator is None else f"'{layout.separator}'"
        raise DataError(f"{where}: {column} {target!r} is separated by {other!r}; {layout.describe()} CSVs "
                        f"separate labels with {wanted}")
    classes = []
    for token in tokens:
        try:
            value = int(token)
        except ValueError:
            raise DataError(f"{where}: label {token!r} is not an integer in 0..{num_classes - 1}") from None
        if not 0 <= value < num_classes:
            raise DataError(f"{where}: label {value} out of range 0..{num_classes - 1} (the class set has "
                            f"{num_classes} classes)")
        classes.append(value)
    return classes


def label_layout(columns: object, csv_path: Path) -> LabelLayout:
    """The layout whose two columns the CSV has; one line naming the file and the columns found otherwise."""
    found = [str(c) for c in columns]
    for layout in LABEL_LAYOUTS:
        if {layout.id_column, layout.label_column} <= set(found):
            return layout
    expected = " or ".join(layout.describe() for layout in LABEL_LAYOUTS)
    raise DataError(f"{csv_path}: missing columns {expected} (found {', '.join(found)})")


def check_id(sample_id: object, where: str) -> str:
    # Ids become file names: anything that could leave the image folder is refused.
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise DataError(f"{where}: empty Id")
    if "/" in sample_id or "\\" in sample_id or ".." in sample_id or sample_id != sample_id.strip():
        raise DataError(f"{where}: Id {sample_id!r} contains a path separator, '..' or surrounding spaces")
    return sample_id


def read_csv_strings(csv_path: Path, expected_columns: str) -> pd.DataFrame:
    """A CSV as strings (empty cells stay ""); unreadable or empty files become one-line DataErrors."""
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: empty CSV, expected columns {expected_columns}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{csv_path}: not a readable CSV ({str(err).splitlines()[0]})") from None


def _header(csv_path: Path) -> list[str]:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found")
    try:
        return [str(c) for c in pd.read_csv(csv_path, nrows=0, encoding="utf-8-sig").columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return []  # read_label_table says what is wrong with it


def read_label_table(csv_path: str | Path, classes: ClassSet = HPA2018) -> LabelTable:
    """Read and validate a label CSV (either layout) against `classes`; row numbers in messages are file line numbers
    (header = line 1)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found")
    frame = read_csv_strings(csv_path, " or ".join(layout.describe() for layout in LABEL_LAYOUTS))
    layout = label_layout(frame.columns, csv_path)
    if layout.name == "HPA 2021" and classes.name == HPA2018.name:
        raise DataError(f"{csv_path}: an HPA 2021 CSV (ID,Label: '|'-separated labels over its 19 classes) read with "
                        f"data.classes=hpa2018 (Kaggle 2018's 28 classes); train on it with data=hpa2021 (or "
                        f"data.classes=hpa2021)")
    if frame.empty:
        raise DataError(f"{csv_path}: no samples (header only)")
    labels = np.zeros((len(frame), len(classes)), dtype=np.uint8)
    first_line: dict[str, int] = {}
    ids = frame[layout.id_column].tolist()
    targets = frame[layout.label_column].tolist()
    for row, (sample_id, target) in enumerate(zip(ids, targets, strict=True)):
        line = row + 2
        where = f"{csv_path} row {line}"
        check_id(sample_id, where)
        if sample_id in first_line:
            raise DataError(f"{where}: duplicate Id {sample_id} (first at row {first_line[sample_id]})")
        first_line[sample_id] = line
        labels[row, parse_target(target, f"{where} (Id {sample_id})", len(classes), layout)] = 1
    return LabelTable(ids=ids, targets=targets, labels=labels, layout=layout)


def channel_path(image_dir: Path, sample_id: str, channel: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        candidate = image_dir / f"{sample_id}_{channel}{ext}"
        if candidate.is_file():
            return candidate
    tried = "/".join(IMAGE_EXTENSIONS)
    raise DataError(f"{image_dir / (sample_id + '_' + channel)}.png: missing channel file (tried {tried})")


# How 16-bit channels (HPA 2021 competition PNGs, HPA website TIFFs) become 8-bit: `divide` maps value v to
# round(v / 257), so a 16-bit copy of an 8-bit image (v * 257) packs to exactly the original bytes; `percentile`
# stretches each image's [0.1, 99.9] percentile range to [0, 255], for low-range data (a real 2048 px HPA green
# channel has mean 308 of 65535, which `divide` would turn into an almost black image).
SIXTEEN_BIT_RULES = ("divide", "percentile")
PERCENTILE_RANGE = (0.1, 99.9)
# An RGB channel file (HPAv18 external data) carries its signal in its own colour plane(s); yellow is red + green.
CHANNEL_PLANES = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}
# JPEG chroma noise leaves a few grey levels in the other planes; more than this is a composite image.
OFF_PLANE_TOLERANCE = (0.25, 2.0)  # off-plane mean may be up to 25 % of the channel's plane mean + 2 grey levels


def _sixteen_to_eight(array: np.ndarray, rule: str) -> np.ndarray:
    values = array.astype(np.float64)
    if rule == "percentile":
        low, high = np.percentile(values, PERCENTILE_RANGE)
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        values = (values - low) * (255.0 / (high - low))
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)


def channel_plane(rgb: Image.Image, path: Path, channel: str) -> np.ndarray:
    """The plane(s) of `channel` of the RGB image `rgb` as uint8 (H, W); a composite (other planes carrying signal,
    OFF_PLANE_TOLERANCE) is refused with one line naming `path`."""
    # In integers and in Pillow: a 2048 px RGB file as float64 is 100 MB, and converting it took 3-4x as long as
    # decoding it; the plane sums come from Pillow's histogram and the plane from getchannel, without the whole RGB
    # array (the sums are exact, so the check and the pixels are those of the numpy rule they replaced).
    planes = CHANNEL_PLANES[channel]
    others = [i for i in range(3) if i not in planes]
    pixels = rgb.size[0] * rgb.size[1]
    sums = (np.asarray(rgb.histogram(), dtype=np.int64).reshape(3, 256) @ np.arange(256, dtype=np.int64)).tolist()
    own_mean = sum(sums[i] for i in planes) / (pixels * len(planes))
    off_mean = sum(sums[i] for i in others) / (pixels * len(others))
    share, floor = OFF_PLANE_TOLERANCE
    if off_mean > share * own_mean + floor:
        raise DataError(f"{path}: an RGB composite, not a {channel} channel file (its other colour planes carry "
                        f"signal: mean {off_mean:.1f} vs {own_mean:.1f}); HPA channel files hold their channel "
                        f"in its own colour plane (yellow in red and green)")
    if len(planes) == 1:
        return np.asarray(rgb.getchannel(planes[0]), dtype=np.uint8)
    # the mean of two planes rounded half to even (as np.rint): (a + b) // 2, plus 1 when a + b is odd and the half
    # is odd
    total = np.asarray(rgb.getchannel(planes[0])).astype(np.uint16) + np.asarray(rgb.getchannel(planes[1]))
    half = total >> 1
    return (half + (total & half & 1)).astype(np.uint8)


# Kaggle's layout puts the images to predict in <input>/test/; predict and explain look there first.
KAGGLE_IMAGE_DIR = "test"

# HPA images are at most about 3072 x 3072 px (9.4 Mpx). A channel file whose header declares more pixels than this
# bound is an image bomb (a 400 KB PNG can declare 20000 x 20000 px, 400 MB once decoded) or not a microscopy image:
# it is refused from its header, before anything is decoded (data.max_image_pixels; pack and predict:
# max_image_pixels=).
DEFAULT_MAX_IMAGE_PIXELS = 16384 * 16384
# Pillow checks its own bomb limit (Image.MAX_IMAGE_PIXELS, 89 Mpx) inside Image.open: above it a warning and a full
# decode, above twice it a DecompressionBombError. For channel files the configurable bound above replaces it: a
# refusal naming the file whatever the size, never a warning followed by a decode, and no error below the bound.
# Pillow reads the module global at each open, so it is lifted for the header read only; the lock keeps two threads
# of this module from restoring each other's value (the project decodes in processes, so it is never contended).
_PILLOW_LIMIT_LOCK = threading.Lock()
# JPGs much larger than the decode target are decoded by DCT scaling (Pillow's draft: libjpeg decodes at 1/2, 1/4 or
# 1/8 scale), the largest reduction that keeps at least JPEG_DRAFT_OVERSAMPLING x the target, and then resized to it as
# usual (resize_square) where the draft lands above it: a 2048 px HPAv18 JPG packed at 512 px is decoded at 1/4 scale,
# 512 px, and not resized. The rule is chosen by the ideal downsample, the box-filtered (area-average) full decode:
# against it, drafting straight to the target is closer than drafting to twice it and resizing with the anti-aliasing
# triangle filter (the rule before, `draft-x2`): 0.62 vs 1.20 grey levels mean (p99 2.3 vs 3.9) on 2048 -> 512 px
# HPAv18-style JPGs, and 3.5-3.8x a plain full-decode loop per sample on one core where `draft-x2` was 1.9-2.0x (bench
# section 6). The reduced IDCT averages each 8x8 block down to 4x4, 2x2 or 1 pixel, itself close to a box filter (1/8
# keeps the block's mean); what it cannot save is the entropy decoding, most of a draft's time. Where the draft lands
# above the target (a ratio not a power of two), resizing it by the triangle filter was closer to the box-filtered full
# decode than resizing it by a box (e.g. 1.6 vs 2.2 grey levels at 256 -> 40 px), and keeps a JPG's perceptual hash
# close to its PNG copy's (duplicates across sources). Nothing is drafted when the file is less than twice the
# oversampled target (the smallest reduction is 1/2).
JPEG_DRAFT_OVERSAMPLING = 1


def check_max_pixels(value: object, key: str = "data.max_image_pixels") -> int:
    """The pixel bound as a positive int; one line naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{key}={value!r}: expected a number of pixels >= 1 (default {DEFAULT_MAX_IMAGE_PIXELS}, "
                        f"16384 x 16384)")
    return int(value)


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open `path` (reading its header only) and refuse it when it declares more than `max_pixels` pixels."""
    with _PILLOW_LIMIT_LOCK:
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise DataError(f"{path}: {width}x{height} px ({width * height / 1e6:.0f} Mpx) is above the bound of "
                        f"{max_pixels} px (data.max_image_pixels; pack, predict: max_image_pixels=); refused before "
                        f"decoding: an image bomb or not a microscopy channel image")
    return img


def _decode(path: Path, channel: str | None, sixteen_bit: str, size: int | None,
            max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (H, W) array, the file's (width, height) from its header); see decode_channel."""
    try:
        with _open_checked(path, max_pixels) as img:
            header_size = img.size
            if size is not None and img.format == "JPEG" and 2 * JPEG_DRAFT_OVERSAMPLING * size <= min(header_size):
                img.draft(img.mode, (JPEG_DRAFT_OVERSAMPLING * size,) * 2)  # the mode kept: RGB keeps its planes
            img.load()
            return _pixels(img, path, channel, sixteen_bit), header_size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot decode image ({reason})") from None


def _pixels(img: Image.Image, path: Path, channel: str | None, sixteen_bit: str) -> np.ndarray:
    """The loaded image `img` as uint8 (H, W); see decode_channel."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_to_eight(np.asarray(img), sixteen_bit)
    if mode in ("RGB", "RGBA", "P", "PA"):
        if channel is None:
            raise DataError(f"{path}: an RGB image, but which channel it holds is unknown")
        return channel_plane(img if mode == "RGB" else img.convert("RGB"), path, channel)
    kind = {"1": "a 1-bit (mask) image", "F": "a floating-point image"}.get(mode, f"mode {mode}")
    raise DataError(f"{path}: {kind}; expected an 8- or 16-bit greyscale or an RGB channel image")


def decode_channel(path: Path, channel: str | None = None, sixteen_bit: str = "divide", size: int | None = None,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """One channel file as uint8 (H, W), whatever form HPA ships it in:

    - 8-bit greyscale (`L`, Kaggle 2018 PNGs): as it is; greyscale with alpha (`LA`): the grey plane, alpha dropped.
    - 16-bit greyscale (`I;16*`, `I`: HPA 2021 PNGs, website TIFFs): to 8 bits by `sixteen_bit` (SIXTEEN_BIT_RULES).
    - RGB (`RGB`, `RGBA`, and palette `P` images, expanded): the plane of `channel` (CHANNEL_PLANES; HPAv18 JPGs);
      a file whose other planes carry signal is refused as a composite.
    - 1-bit (`1`) and float (`F`) images are refused: a mask or a computed map, not a microscopy channel.

    `size`: the side the caller resizes to. A JPG at least 2 x JPEG_DRAFT_OVERSAMPLING times as large in both
    dimensions is decoded at the largest DCT reduction that keeps at least JPEG_DRAFT_OVERSAMPLING x `size` px (so the
    array is smaller than the file: exactly `size` where the file is `size` times a power of two, as HPAv18's 2048 px
    files packed at 512 px; resize_square does the rest otherwise). A file whose header declares more than
    `max_pixels` pixels is refused before decoding.
    """
    return _decode(path, channel, sixteen_bit, size, max_pixels)[0]


def resize_square(channel: np.ndarray, size: int) -> np.ndarray:
    if channel.shape == (size, size):
        return channel
    # reducing_gap makes large downscales (2048 px external data -> 512) average like an area filter, at bilinear cost.
    img = Image.fromarray(channel).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def load_sample(image_dir: str | Path, sample_id: str, size: int | None, sixteen_bit: str = "divide",
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode the four channels of one sample into a uint8 array (4, size, size) in R,G,B,Y order (JPGs at a reduced
    DCT scale where `size` allows, decode_channel; then resize_square); a channel file above `max_pixels` pixels is
    refused unread.
    `size=None`: at the files' own resolution, (4, H, W), nothing drafted or resized (cell crops are cut from it)."""
    image_dir = Path(image_dir)
    channels = []
    first_size, first_path = None, None
    for name in CHANNELS:
        path = channel_path(image_dir, sample_id, name)
        array, file_size = _decode(path, name, sixteen_bit, size, max_pixels)
        # the files' own sizes: JPGs decoded at a reduced scale could agree after scaling and still differ
        if first_size is None:
            first_size, first_path = file_size, path
        elif file_size != first_size:
            raise DataError(f"{path}: size {file_size[0]}x{file_size[1]} differs from "
                            f"{first_path.name} ({first_size[0]}x{first_size[1]})")
        channels.append(array if size is None else resize_square(array, size))
    return np.stack(channels)


@dataclass(frozen=True)
class DataSource:
    """One Kaggle-layout folder: its label CSV and its image folder (channel files of any supported extension)."""

    root: Path
    csv: Path
    image_dir: Path

    @property
    def name(self) -> str:
        return self.root.resolve().name


def parse_sources(root: object, image_dir: str = "train") -> list[DataSource]:
    """`data.root` as sources: a folder, or a list of folders and/or {root, csv, image_dir} mappings (e.g. Kaggle train
    plus HPAv18), in priority order (a duplicate is kept from the earliest source)."""
    entries = list(root) if isinstance(root, (list, tuple)) or type(root).__name__ == "ListConfig" else [root]
    sources = []
    for position, entry in enumerate(entries):
        if hasattr(entry, "get") and not isinstance(entry, (str, Path)):
            folder = entry.get("root")
            if not folder:
                raise DataError(f"data.root[{position}]: a source mapping needs root (and may give csv, image_dir)")
            folder = Path(str(folder))
            csv = Path(str(entry.get("csv") or folder / "train.csv"))
            images = folder / str(entry.get("image_dir") or image_dir)
        else:
            if entry in (None, "", "???"):
                raise DataError("data.root: required (the folder holding train.csv and train/)")
            folder = Path(str(entry))
            csv, images = folder / "train.csv", folder / image_dir
        sources.append(DataSource(root=folder, csv=csv, image_dir=images))
    if not sources:
        raise DataError("data.root: required (the folder holding train.csv and train/)")
    return sources


def read_sources(sources: list[DataSource], classes: ClassSet = HPA2018) -> tuple[LabelTable, np.ndarray]:
    """The label tables of all sources, concatenated, and each row's source index; an Id in two sources, or sources
    whose CSVs are of different competitions (other class sets), are refused with one line naming both places."""
    if len(sources) > 1:  # before any label is read: a 2018 CSV's ids are out of range of 2021's classes
        layouts = [label_layout(_header(source.csv), source.csv) for source in sources]
        for source, layout in zip(sources[1:], layouts[1:], strict=True):
            if layout != layouts[0]:
                raise DataError(f"{source.csv}: a {layout.name} CSV ({layout.describe()}) beside the {layouts[0].name} "
                                f"CSV {sources[0].csv} ({layouts[0].describe()}); sources of different class sets "
                                f"cannot be mixed in one data.root")
    tables = [read_label_table(source.csv, classes) for source in sources]
    first_seen: dict[str, tuple[int, int]] = {}
    for index, table in enumerate(tables):
        for row, sample_id in enumerate(table.ids):
            if sample_id in first_seen:
                other, other_row = first_seen[sample_id]
                raise DataError(f"{sources[index].csv} row {row + 2}: Id {sample_id} is also {sources[other].csv} "
                                f"row {other_row + 2}; Ids must be unique across the sources of data.root")
            first_seen[sample_id] = (index, row)
    merged = LabelTable(ids=[i for t in tables for i in t.ids], targets=[g for t in tables for g in t.targets],
                        labels=np.concatenate([t.labels for t in tables]), layout=tables[0].layout)
    return merged, np.concatenate([np.full(len(t), index) for index, t in enumerate(tables)])

