# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Load MVTec AD, VisA and generic image folders as `datasets.Dataset`.

Every loader returns the same features (`FEATURES`):

- `image`: `datasets.Image(mode="RGB")`, decoded as 8-bit RGB with the EXIF orientation applied;
- `mask`: `datasets.Image(mode="L")`, 0 for normal and 255 for anomalous pixels, the size of the image
  (all zero for normal images);
- `label`: `ClassLabel(names=["normal", "anomalous"])`, taken from the layout (`good` or `normal`
  is normal), never from the alphabetical order of folders;
- `category`, `defect_type` (`"good"` for normal images) and `image_path` (the source file).

Files are checked while the data set is built, so problems surface at once instead of in the middle of
an evaluation. Images that `datasets` decodes correctly by itself (8-bit modes, EXIF rotation) are stored
by path. 16-bit and float images are converted (16-bit values are scaled by `>> 8`, not clipped), and
masks that are not already 0/255 in mode L are binarised at `> 0`. Both are stored as PNG bytes. An
unreadable image is logged and skipped. A missing or wrongly sized mask of a defective image raises an
error that names the file.

Example:
    >>> from cmi_clip.data import load_mvtec_ad  # doctest: +SKIP
    >>> dataset = load_mvtec_ad("/data/mvtec_ad", categories=["bottle"], split="test")  # doctest: +SKIP
    >>> dataset[0]["image"].mode, dataset.features["label"].names  # doctest: +SKIP
    ('RGB', ['normal', 'anomalous'])
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURES",
    "IMAGE_EXTENSIONS",
    "LABEL_NAMES",
    "load_dataset_auto",
    "load_image_folder",
    "load_mvtec_ad",
    "load_visa",
    "read_image",
    "read_mask",
    "to_rgb",
]

LABEL_NAMES: list[str] = ["normal", "anomalous"]
NORMAL_FOLDER_NAMES: tuple[str, ...] = ("good", "normal", "ok")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

FEATURES = datasets.Features(
    {
        "image": datasets.Image(mode="RGB"),
        "mask": datasets.Image(mode="L"),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "category": datasets.Value("string"),
        "defect_type": datasets.Value("string"),
        "image_path": datasets.Value("string"),
    }
)

# Modes that `datasets.Image(mode="RGB")` decodes correctly by itself (EXIF transpose, then convert).
_DIRECT_RGB_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


# ----------------------------------------------------------------------------------------------
# Reading and converting files
# ----------------------------------------------------------------------------------------------


def _integer_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale integer pixel values of a 16-bit or 32-bit image to uint8."""
    if values.size and (values.min() < 0 or values.max() > 65535):
        msg = f"Mode {mode} image has values in [{values.min()}, {values.max()}], outside 0..65535; convert it to 8-bit or 16-bit first."
        raise ValueError(msg)
    # NOTE: a mode "I" image whose values all fit in 0..255 is read as 8-bit data. A real 16-bit image
    # that dark would map to black under `>> 8` anyway.
    if mode == "I" and values.size and values.max() <= 255:
        return values.astype(np.uint8)
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB, applying its EXIF orientation.

    - `I;16*` (16-bit) and `I` (32-bit integer) values are scaled to 8 bits by `value >> 8`, not
      clipped. A mode `I` image whose values all fit in 0..255 is taken as 8-bit data.
    - `F` (float) images with values in `[0, 1]` are multiplied by 255. Values in `[0, 255]` are rounded.
    - `RGBA`, `LA` and `PA` lose their alpha channel. `P` (palette), `1`, `L`, `CMYK` and the other
      8-bit modes are converted with `Image.convert("RGB")`, as `datasets.Image(mode="RGB")` does.

    Args:
        image: Any PIL image.

    Returns:
        An RGB image, upright according to its EXIF orientation tag.

    Raises:
        ValueError: If the mode is unsupported or the values do not fit 16 bits (or `[0, 255]` for float).
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        gray = _integer_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif low < 0.0 or high > 255.0:
            msg = f"Float image has values in [{low}, {high}]; expected [0, 1] or [0, 255]. Rescale it before loading."
            raise ValueError(msg)
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # Palette transparency stored as bytes must go through RGBA, or PIL warns on a direct conversion.
        return image.convert("RGBA").convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return image.convert("RGB")
    msg = f"Unsupported image mode {mode!r}; save the image as 8-bit or 16-bit RGB or grayscale."
    raise ValueError(msg)


def _open_loaded(path: str | Path) -> Image.Image:
    """Open and fully decode an image, so truncated or corrupt files fail here."""
    with Image.open(path) as handle:
        handle.load()
        image = handle.copy()
    image.info.update(handle.info)
    return image


def read_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB (see `to_rgb` for the conversions).

    Args:
        path: Image file.

    Returns:
        The RGB image, upright according to its EXIF orientation.

    Raises:
        OSError: If the file is missing, truncated or not an image (`PIL.UnidentifiedImageError`).
        ValueError: If its mode cannot be converted; the message names the file.
    """
    return _convert_loaded(_open_loaded(path), path)


def _convert_loaded(image: Image.Image, path: str | Path) -> Image.Image:
    """Convert a decoded image with `to_rgb`; the error names `path`."""
    try:
        return to_rgb(image)
    except ValueError as error:
        msg = f"Cannot convert {path}: {error}"
        raise ValueError(msg) from error


def _mask_values(image: Image.Image) -> np.ndarray:
    """One-channel array of a mask image; colour masks are reduced to the maximum over channels."""
    mode = image.mode
    if mode == "P":
        # Palette masks (VisA and VOC style) store class ids as indices; index 0 is the background.
        return np.asarray(image)
    if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB")).max(axis=-1)
    if mode in ("LA", "La", "PA"):
        return np.asarray(image)[..., 0]
    return np.asarray(image)


def _load_mask(path: str | Path, size: tuple[int, int] | None, image_path: str | Path | None) -> tuple[Image.Image, bool]:
    """Return the binarised mask and whether the file already was an upright mode L image of 0 and 255."""
    raw = _open_loaded(path)
    image = ImageOps.exif_transpose(raw)
    if size is not None and image.size != tuple(size):
        owner = f"image {image_path}" if image_path is not None else "its image"
        msg = (
            f"Mask {path} has size {image.size[0]}x{image.size[1]} but {owner} has size {size[0]}x{size[1]} (width x height). "
            "Masks are never resized; save a mask of the image's size."
        )
        raise ValueError(msg)
    values = _mask_values(image)
    already_binary = image is raw and raw.mode == "L" and bool(np.isin(values, (0, 255)).all())
    binary = (values > 0).astype(np.uint8) * 255
    return Image.fromarray(binary, mode="L"), already_binary


def read_mask(path: str | Path, size: tuple[int, int] | None = None, image_path: str | Path | None = None) -> Image.Image:
    """Read a ground-truth mask and binarise it: every value > 0 is anomalous.

    Works for masks stored as 0/255 or 0/1, as class ids (VisA), in mode `1`, `L`, `P`, `RGB`, `RGBA`
    or 16-bit. The EXIF orientation is applied, as for images.

    Args:
        path: Mask file.
        size: Expected `(width, height)`, the size of the image; None skips the check.
        image_path: Image that the mask belongs to, named in the size error.

    Returns:
        A mode `L` image with values 0 and 255.

    Raises:
        OSError: If the file is missing or unreadable.
        ValueError: If the mask size differs from `size`; the message names both files and sizes.
    """
    return _load_mask(path, size, image_path)[0]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_mask_value(path: Path, size: tuple[int, int], image_path: Path) -> dict[str, Any]:
    """Mask for the data set: by path when the file already is mode L with only 0 and 255, else as PNG bytes."""
    binary, already_binary = _load_mask(path, size, image_path)
    if already_binary:
        return {"path": str(path), "bytes": None}
    return {"path": None, "bytes": _png_bytes(binary)}


@functools.lru_cache(maxsize=64)
def _zero_mask_bytes(size: tuple[int, int]) -> bytes:
    return _png_bytes(Image.new("L", size, 0))


# ----------------------------------------------------------------------------------------------
# Building a data set from a list of files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One image of a layout, before its files are read."""

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect_type: str


@dataclass(frozen=True)
class _Unreadable:
    path: Path
    error: Exception


def _read_entry(entry: _Entry) -> dict[str, Any] | _Unreadable:
    """Read and check the files of one entry; an unreadable file is returned as `_Unreadable`, not raised."""
    try:
        raw = _open_loaded(entry.image_path)
        rgb = _convert_loaded(raw, entry.image_path)
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as error:
        return _Unreadable(entry.image_path, error)

    # 8-bit modes are stored by path: `datasets.Image(mode="RGB")` applies EXIF and converts on decoding.
    # Converted images are stored as bytes without a path, because `datasets` drops the bytes of an
    # entry whose path is an existing file.
    if raw.mode in _DIRECT_RGB_MODES:
        image_value = {"path": str(entry.image_path), "bytes": None}
    else:
        image_value = {"path": None, "bytes": _png_bytes(rgb)}

    if entry.mask_path is not None:
        try:
            mask_value = _read_mask_value(entry.mask_path, rgb.size, entry.image_path)
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            return _Unreadable(entry.mask_path, error)
    elif entry.label == 0:
        mask_value = {"path": None, "bytes": _zero_mask_bytes(rgb.size)}
    else:
        mask_value = None
    return {
        "image": image_value,
        "mask": mask_value,
        "label": entry.label,
        "category": entry.category,
        "defect_type": entry.defect_type,
        "image_path": str(entry.image_path),
    }


def _build_dataset(entries: Sequence[_Entry], description: str, num_workers: int | None) -> datasets.Dataset:
    """Read all entries (in threads, since PIL releases the GIL while decoding) into a `datasets.Dataset`."""
    if not entries:
        msg = f"No images found for {description}."
        raise FileNotFoundError(msg)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    skipped = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_read_entry, entries)
        for result in tqdm(results, total=len(entries), desc=f"Reading {description}", unit="image"):
            if isinstance(result, _Unreadable):
                logger.warning("Skipping unreadable file %s: %s", result.path, result.error)
                skipped += 1
                continue
            rows.append(result)
    if skipped:
        logger.warning("Skipped %d unreadable files of %s", skipped, description)
    if not rows:
        msg = f"All {len(entries)} images of {description} are unreadable; see the warnings above."
        raise OSError(msg)

    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def _check_root(root: str | Path, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        msg = f"{layout} root folder {root} does not exist or is not a folder; pass the folder that contains the data set."
        raise FileNotFoundError(msg)
    return root


def _listing(folder: Path, limit: int = 20) -> str:
    names = sorted(child.name + ("/" if child.is_dir() else "") for child in folder.iterdir() if not child.name.startswith("."))
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown or "nothing"


def _list_images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS)


def _select_categories(categories: str | Iterable[str] | None, available: Sequence[str], where: str) -> list[str]:
    if categories is None:
        return list(available)
    selected = [categories] if isinstance(categories, str) else list(categories)
    missing = [category for category in selected if category not in available]
    if missing:
        msg = f"Categories {missing} not found in {where}; available: {list(available)}."
        raise FileNotFoundError(msg)
    return selected


def _check_split(split: str, choices: Sequence[str]) -> str:
    if split not in choices:
        msg = f"Invalid split {split!r}; expected one of {list(choices)}."
        raise ValueError(msg)
    return split


def _is_normal(name: str) -> bool:
    return name.lower() in NORMAL_FOLDER_NAMES


def _index_files(folder: Path) -> dict[str, Path]:
    """Files of a folder by lower-case name (empty if the folder is missing)."""
    if not folder.is_dir():
        return {}
    return {path.name.lower(): path for path in folder.iterdir() if path.is_file()}


def _find_mask(files_by_name: dict[str, Path], stem: str, suffix: str) -> Path | None:
    """Find the mask of image `stem`: `<stem><suffix>.<ext>` first, then `<stem>.<ext>`, any image extension and case."""
    for candidate_stem in (stem + suffix, stem):
        for extension in IMAGE_EXTENSIONS:
            found = files_by_name.get((candidate_stem + extension).lower())
            if found is not None:
                return found
    return None


def _defect_entries(image_folders: Path, category: str, mask_root: Path | None, mask_suffix: str) -> list[_Entry]:
    """List the images of `good/` and each defect folder in `image_folders`, with their masks under `mask_root`."""
    entries = []
    for defect_folder in sorted(path for path in image_folders.iterdir() if path.is_dir() and not path.name.startswith(".")):
        if defect_folder.name == "ground_truth":
            continue
        normal = _is_normal(defect_folder.name)
        defect_type = "good" if normal else defect_folder.name
        masks_by_name = _index_files(mask_root / defect_folder.name) if mask_root is not None and not normal else {}
        for image_path in _list_images(defect_folder):
            mask_path = None
            if not normal and mask_root is not None:
                mask_path = _find_mask(masks_by_name, image_path.stem, mask_suffix)
                if mask_path is None:
                    msg = (
                        f"Mask of defective image {image_path} not found: expected "
                        f"{mask_root / defect_folder.name / (image_path.stem + mask_suffix + '.png')}. "
                        "Add the mask, or move the image out of the data set."
                    )
                    raise FileNotFoundError(msg)
            entries.append(_Entry(image_path, mask_path, 0 if normal else 1, category, defect_type))
    return entries


def load_mvtec_ad(
    root: str | Path,
    categories: str | Sequence[str] | None = None,
    split: str = "test",
    num_workers: int | None = None,
) -> datasets.Dataset:
    """Load MVTec AD (or any data set in its layout) as a `datasets.Dataset` with `FEATURES`.

    Layout: `<root>/<category>/train/good/*.png`, `<root>/<category>/test/<defect or good>/*.png` and
    `<root>/<category>/ground_truth/<defect>/<name>_mask.png`.

    Args:
        root: Folder that contains the category folders.
        categories: Categories to load; None loads every folder that has `train/` or `test/`.
        split: `"train"` or `"test"`.
        num_workers: Threads that read files; None uses up to 8.

    Returns:
        The data set, ordered by category, defect folder and file name.

    Raises:
        FileNotFoundError: If the root, a category, a split folder or a defective image's mask is
            missing; the message lists what was found.
        ValueError: If a mask's size differs from its image's, or `split` is invalid.
    """
    _check_split(split, ("train", "test"))
    root = _check_root(root, "MVTec AD")
    available = sorted(path.name for path in root.iterdir() if path.is_dir() and ((path / "train").is_dir() or (path / "test").is_dir()))
    if not available:
        msg = f"No MVTec AD category folders (<category>/train or <category>/test) under {root}; found: {_listing(root)}."
        raise FileNotFoundError(msg)
    selected = _select_categories(categories, available, str(root))

    entries: list[_Entry] = []
    for category in selected:
        split_folder = root / category / split
        if not split_folder.is_dir():
            msg = f"Split folder {split_folder} not found; {root / category} contains: {_listing(root / category)}."
            raise FileNotFoundError(msg)
        entries.extend(_defect_entries(split_folder, category, root / category / "ground_truth", "_mask"))
    return _build_dataset(entries, f"MVTec AD {split} split of {selected} in {root}", num_workers)


_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}


def load_visa(
    root: str | Path,
    categories: str | Sequence[str] | None = None,
    split: str = "test",
    csv_file: str | Path = "split_csv/1cls.csv",
    num_workers: int | None = None,
) -> datasets.Dataset:
    """Load VisA from its split CSV as a `datasets.Dataset` with `FEATURES`.

    The CSV (`split_csv/1cls.csv` in the VisA release) has the columns `object, split, label, image,
    mask`. Labels are `normal` or `anomaly`, paths are relative to `root`, and the mask cell of normal
    rows is empty. Anomalous images get the defect type `"anomaly"`, because VisA does not name defect
    types in this file.

    Args:
        root: VisA root folder (the one that contains `split_csv/`).
        categories: Objects to load; None loads all objects in the CSV.
        split: `"train"` or `"test"`.
        csv_file: Split CSV, relative to `root` or absolute.
        num_workers: Threads that read files; None uses up to 8.

    Returns:
        The data set, in CSV order.

    Raises:
        FileNotFoundError: If the root, the CSV, an object, or a row's image or mask file is missing;
            the message names the CSV row.
        ValueError: If a column, a label or a split value is invalid, or a mask size differs from its image.
    """
    _check_split(split, ("train", "test"))
    root = _check_root(root, "VisA")
    csv_path = Path(csv_file) if Path(csv_file).is_absolute() else root / csv_file
    if not csv_path.is_file():
        msg = f"VisA split file {csv_path} not found; {root} contains: {_listing(root)}."
        raise FileNotFoundError(msg)

    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = [column for column in _VISA_COLUMNS if column not in fieldnames]
        if missing:
            msg = f"{csv_path} lacks columns {missing}; found {fieldnames}, expected {list(_VISA_COLUMNS)}."
            raise ValueError(msg)
        rows = [({key.strip(): (value or "").strip() for key, value in row.items() if key is not None}, reader.line_num) for row in reader]

    available = sorted({row["object"] for row, _ in rows})
    selected = set(_select_categories(categories, available, str(csv_path)))

    entries: list[_Entry] = []
    for row, line in rows:
        if row["object"] not in selected or row["split"].lower() != split:
            continue
        where = f"row at line {line} of {csv_path} ({row['object']}, {row['image']})"
        label = _VISA_LABELS.get(row["label"].lower())
        if label is None:
            msg = f"Invalid label {row['label']!r} in {where}; expected one of {list(_VISA_LABELS)}."
            raise ValueError(msg)
        image_path = root / row["image"]
        if not image_path.is_file():
            msg = f"Image file {image_path} of {where} not found; check the path in the CSV and the root folder."
            raise FileNotFoundError(msg)
        mask_path = root / row["mask"] if row["mask"] else None
        if label == 1 and mask_path is None:
            msg = f"Anomalous {where} has an empty mask cell; add the mask path to the CSV."
            raise ValueError(msg)
        if mask_path is not None and not mask_path.is_file():
            msg = f"Mask file {mask_path} of {where} not found; check the path in the CSV and the root folder."
            raise FileNotFoundError(msg)
        defect_type = "anomaly" if label else "good"
        entries.append(_Entry(image_path, mask_path, label, row["object"], defect_type))
    return _build_dataset(entries, f"VisA {split} split of {sorted(selected)} in {root}", num_workers)


def load_image_folder(
    root: str | Path,
    category: str | None = None,
    mask_suffix: str = "_mask",
    num_workers: int | None = None,
) -> datasets.Dataset:
    """Load a generic folder of normal and defective images as a `datasets.Dataset` with `FEATURES`.

    Layout: `<folder>/good/*` (normal images), `<folder>/<defect>/*` (one folder per defect type) and,
    optionally, `<folder>/ground_truth/<defect>/<name><mask_suffix>.png` (or `<name>.png`). `<folder>`
    is `root/category`, or `root` itself when `category` is None. Folders named `good`, `normal` or
    `ok` hold normal images; every other folder is a defect type.

    Without a `ground_truth` folder, defective images have no mask (`mask` is None) and only
    image-level metrics can be computed. With it, every defective image needs its mask.

    Args:
        root: Data set folder.
        category: Subfolder of `root` to load, which also becomes the category name; None loads `root`
            and names the category after it.
        mask_suffix: Suffix of mask file names before the extension.
        num_workers: Threads that read files; None uses up to 8.

    Returns:
        The data set, ordered by folder and file name.

    Raises:
        FileNotFoundError: If the folder, its image subfolders or a required mask is missing.
        ValueError: If a mask's size differs from its image's.
    """
    root = _check_root(root, "Image folder")
    folder = root / category if category is not None else root
    if not folder.is_dir():
        msg = f"Category folder {folder} not found; {root} contains: {_listing(root)}."
        raise FileNotFoundError(msg)
    subfolders = [path for path in folder.iterdir() if path.is_dir() and path.name != "ground_truth" and not path.name.startswith(".")]
    if not subfolders:
        msg = f"No image subfolders (good/ and one per defect type) in {folder}; found: {_listing(folder)}."
        raise FileNotFoundError(msg)
    loose = _list_images(folder)
    if loose:
        logger.warning("Ignoring %d images directly in %s; put them in good/ or in a defect folder.", len(loose), folder)

    mask_root = folder / "ground_truth"
    if not mask_root.is_dir():
        logger.info("No ground_truth folder in %s: defective images have no mask, so pixel metrics are unavailable.", folder)
    name = category if category is not None else folder.name
    entries = _defect_entries(folder, name, mask_root if mask_root.is_dir() else None, mask_suffix)
    return _build_dataset(entries, f"image folder {folder}", num_workers)


# ----------------------------------------------------------------------------------------------
# Layout detection and the Hub
# ----------------------------------------------------------------------------------------------

DATA_FORMATS: tuple[str, ...] = ("mvtec", "visa", "folder", "hub")
# Other accepted spellings of a format, such as the data set's own name.
DATA_FORMAT_ALIASES: dict[str, str] = {"mvtec_ad": "mvtec"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _detect_format(path: Path) -> str:
    if (path / "split_csv" / "1cls.csv").is_file():
        return "visa"
    subfolders = [child for child in path.iterdir() if child.is_dir()]
    if any((child / "train").is_dir() or (child / "test").is_dir() for child in subfolders):
        return "mvtec"
    if (path / "train").is_dir() or (path / "test").is_dir():
        return "mvtec_category"
    if any(_is_normal(child.name) for child in subfolders) or any(any(_is_normal(grandchild.name) for grandchild in child.iterdir() if grandchild.is_dir()) for child in subfolders):
        return "folder"
    msg = (
        f"Cannot detect the layout of {path}; it contains: {_listing(path)}. Expected MVTec AD (<category>/train, "
        "<category>/test, <category>/ground_truth), VisA (split_csv/1cls.csv) or an image folder (good/ and one folder "
        "per defect type). Pass data_format to choose one."
    )
    raise ValueError(msg)


def _load_hub(dataset_id: str, categories: str | Sequence[str] | None, split: str) -> datasets.Dataset:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        msg = (
            f"Cannot load data set {dataset_id!r} from the Hugging Face Hub because the Hub is unreachable ({error}). "
            "Pass a local folder in the MVTec AD, VisA or image-folder layout instead."
        )
        raise ConnectionError(msg) from error
    if categories is not None and "category" in dataset.column_names:
        wanted = {categories} if isinstance(categories, str) else set(categories)
        dataset = dataset.filter(lambda category: category in wanted, input_columns="category")
    return dataset


def load_dataset_auto(
    root_or_id: str | Path,
    data_format: str | None = None,
    categories: str | Sequence[str] | None = None,
    split: str = "test",
    num_workers: int | None = None,
) -> datasets.Dataset:
    """Load a data set from a local folder of any supported layout, or from the Hugging Face Hub.

    Args:
        root_or_id: Local folder, or a Hub data set id such as `"user/mvtec_ad"`.
        data_format: `"mvtec"` (or `"mvtec_ad"`), `"visa"`, `"folder"` or `"hub"`; None detects it. A folder with
            `split_csv/1cls.csv` is VisA, one whose subfolders have `train/` or `test/` is MVTec AD
            (a single MVTec category folder also works), and one with `good/` folders is an image folder.
            A string that is not an existing path is a Hub id.
        categories: Categories to load; None loads all.
        split: `"train"` or `"test"`; the image-folder layout has no splits and ignores it.
        num_workers: Threads that read files; None uses up to 8.

    Returns:
        A `datasets.Dataset`; local layouts have `FEATURES`.

    Raises:
        ConnectionError: If a Hub id is given and the Hub is unreachable; the message names the id.
        FileNotFoundError: If a local path does not exist.
        ValueError: If the layout cannot be detected or `data_format` is invalid.
    """
    data_format = DATA_FORMAT_ALIASES.get(data_format, data_format)
    if data_format is not None and data_format not in DATA_FORMATS:
        msg = (
            f"Invalid data_format {data_format!r}; expected one of {[*DATA_FORMATS, *DATA_FORMAT_ALIASES]} "
            "or None to detect it."
        )
        raise ValueError(msg)
    path = Path(root_or_id).expanduser()
    if data_format == "hub" or (data_format is None and not path.exists()):
        if not _HUB_ID.match(str(root_or_id)):
            msg = f"{root_or_id} is neither an existing folder nor a Hugging Face Hub id (user/name); check the path."
            raise FileNotFoundError(msg)
        return _load_hub(str(root_or_id), categories, split)

    detected = data_format or _detect_format(path)
    logger.info("Loading %s as %s layout", path, detected)
    if detected == "visa":
        return load_visa(path, categories=categories, split=split, num_workers=num_workers)
    if detected == "mvtec":
        return load_mvtec_ad(path, categories=categories, split=split, num_workers=num_workers)
    if detected == "mvtec_category":
        return load_mvtec_ad(path.parent, categories=[path.name], split=split, num_workers=num_workers)

    # Image folder: either the folder itself has good/, or each subfolder is one category.
    if split != "test":
        logger.warning("The image-folder layout has no splits; ignoring split=%r.", split)
    if any(_is_normal(child.name) for child in path.iterdir() if child.is_dir()):
        return load_image_folder(path, num_workers=num_workers)
    available = sorted(child.name for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))
    selected = _select_categories(categories, available, str(path))
    parts = [load_image_folder(path, category=category, num_workers=num_workers) for category in selected]
    return datasets.concatenate_datasets(parts)
