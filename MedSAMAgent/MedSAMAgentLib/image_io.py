"""Reading images and volumes, writing masks in the input's exact geometry.

Everything goes through SimpleITK, so 2D files (PNG, JPEG, BMP, TIFF), 3D files
(NIfTI, NRRD, MetaImage) and DICOM series folders share one path, and a mask is
written with the input's size, spacing, origin and direction (``CopyInformation``).

Bad input raises :class:`InputError` with a message for the person who gave it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


from .errors import InputError  # noqa: E402 - re-exported: the engine's one error for a person's mistake
from .durable import atomic_output, native_stderr_held  # noqa: E402
from .file_access import (FileGate, data_files_named_by, dicom_folder_entries, files_read_for,  # noqa: E402
                          parse_user_path, reader_for, require_regular_file)  # noqa: E402


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass
class LoadedImage:
    """An input image. ``image``: the SimpleITK image as read (its geometry is the
    output's); ``dim``: 2 or 3; ``array``: 2D -> H x W (gray) or H x W x 3 (RGB),
    3D -> [z, y, x] in file order; ``source``: path as given; ``series``: DICOM series id."""

    image: object
    dim: int
    array: np.ndarray
    source: str
    series: str | None = None

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 3 and self.dim == 2


def dicom_series_ids(folder: Path) -> list[str]:
    """The DICOM series instance UIDs of the files directly in ``folder`` (GDCM's scan, without
    its warning for every file that is not DICOM); [] when there are none."""
    import SimpleITK as sitk

    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def dicom_series_files(folder: Path, series: str | None) -> list[str]:
    """The files of ``series`` in ``folder`` in the order its slices are read (a volume's z order);
    ``series`` None: the folder's only series (InputError when there are several or none)."""
    import SimpleITK as sitk

    if series is None:
        ids = dicom_series_ids(folder)
        if len(ids) != 1:
            raise InputError(f"{folder} holds {len(ids)} DICOM series; name one." if ids else
                             f"No DICOM series found in the folder {folder}.")
        series = ids[0]
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series))


def _read_dicom_series(folder: Path, series: str | None, gate: FileGate | None = None):
    import SimpleITK as sitk

    dicom_folder_entries(folder, gate)  # the scan opens every entry: links and special files checked first
    ids = dicom_series_ids(folder)
    if not ids:
        raise InputError(f"No DICOM series found in the folder {folder}. Point to the folder that holds the .dcm files.")
    if series is None:
        if len(ids) > 1:
            raise InputError(f"The folder {folder} holds {len(ids)} DICOM series ({', '.join(ids[:4])}"
                             f"{', ...' if len(ids) > 4 else ''}); choose one with --series.")
        series = ids[0]
    elif series not in ids:
        raise InputError(f"Series {series} is not in {folder}; found: {', '.join(ids)}.")
    files = dicom_series_files(folder, series)
    if gate is not None:
        for name in files:
            gate.check(Path(name))
    if too_large := _too_many_voxels(files[0], len(files)):
        raise InputError(f"The DICOM series in {folder} {too_large}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute(), series


def gzip_nifti_is_whole(path: Path, image) -> bool:
    """Whether a .nii.gz file holds all its voxels: ITK reads a cut-off file without a word (the
    missing voxels become 0).  Fast: the gzip trailer's length against the header's voxel offset plus
    the voxel bytes; only when they differ is the stream decompressed to be sure."""
    import gzip
    import struct
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            head = f.read(548)
        with open(path, "rb") as f:
            f.seek(-4, 2)
            stored = struct.unpack("<I", f.read(4))[0]
        order = "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"
        offset = (struct.unpack(order + "f", head[108:112])[0] if struct.unpack(order + "i", head[:4])[0] == 348
                  else struct.unpack(order + "q", head[168:176])[0])
        voxels = int(np.prod(image.GetSize(), dtype=np.int64)) * image.GetNumberOfComponentsPerPixel()
        expected = (int(offset) if offset > 0 else 352) + voxels * image.GetSizeOfPixelComponent()
        if expected % (1 << 32) == stored:
            return True
        with gzip.open(path, "rb") as f:  # several gzip members, or cut off: read it through to know
            while f.read(1 << 24):
                pass
        return True
    except (EOFError, OSError, zlib.error, struct.error):
        return False


def nifti_nonfinite_voxels(path: Path) -> int:
    """How many NaN or infinite values the float voxels of a NIfTI file hold, counted in the file
    itself: ITK's NIfTI reader turns NaN into 0 without a word, so the array it gives cannot tell.
    0 for integer data or a file that is not NIfTI-1/2 (read in 16 MB pieces, any size)."""
    import gzip
    import struct

    def opened(p: Path):
        return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")

    try:
        with opened(path) as fh:
            head = fh.read(540)
        for order in "<>":
            size = struct.unpack(order + "i", head[:4])[0]
            if size in (348, 540):
                break
        else:
            return 0
        if size == 348:  # NIfTI-1: datatype at 70, vox_offset (float) at 108, magic at 344
            code, = struct.unpack(order + "h", head[70:72])
            offset, magic = int(struct.unpack(order + "f", head[108:112])[0]), head[344:347]
        else:  # NIfTI-2: datatype at 12, vox_offset (int64) at 168, magic at 4
            code, = struct.unpack(order + "h", head[12:14])
            offset, magic = struct.unpack(order + "q", head[168:176])[0], head[4:7]
        dtype = {16: "f4", 64: "f8"}.get(code)
        if dtype is None:
            return 0
        data = path
        if magic in (b"ni1", b"ni2"):  # a detached pair: the voxels are in the .img beside it
            data = next((f for f in data_files_named_by(path, "NiftiImageIO").files
                         if f.name.lower().endswith((".img", ".img.gz")) and f.exists()), None)
            if data is None:
                return 0
            offset = max(0, offset)
        item = np.dtype(order + dtype)
        bad = 0
        with opened(data) as fh:
            fh.seek(offset)
            while chunk := fh.read((1 << 24) // item.itemsize * item.itemsize):
                usable = len(chunk) // item.itemsize * item.itemsize
                bad += int((~np.isfinite(np.frombuffer(chunk[:usable], item))).sum())
        return bad
    except (OSError, EOFError, struct.error, ValueError):
        return 0


MAX_VOXELS = 1 << 31  # 2.1 billion voxels (4 GB as int16) before reading: larger is refused as a mistake


def _too_many_voxels(path, count: int = 1) -> str | None:
    """Why the image at ``path`` (times ``count`` files, for a series) is too large to open, read from
    its header alone; None when it fits (or the header says nothing)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # reading it will say what is wrong
    voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * max(1, reader.GetNumberOfComponents()) * count
    if voxels > MAX_VOXELS:
        return (f"has {voxels:,} voxels, more than the {MAX_VOXELS:,} this program opens; crop or resample it "
                f"first.")
    return None


def _check_before_reading(path: Path, what: str, gate: FileGate | None = None) -> None:
    """Refusals made before the voxels are read (``what`` names the file in the message): not a regular
    file (a FIFO, a device), a file the ``gate`` refuses (the file itself or any data file its header
    names: :func:`~.file_access.files_read_for`), more voxels than :data:`MAX_VOXELS`."""
    require_regular_file(path, what)
    files_read_for(path, gate)
    if too_large := _too_many_voxels(path):
        raise InputError(f"{what} {too_large}")


def _check_whole(path: Path, what: str, image) -> None:
    """A .nii.gz that ITK read although it was cut off is refused."""
    if _suffix(path) == ".nii.gz" and not gzip_nifti_is_whole(path, image):
        raise InputError(f"{what} is incomplete or corrupt (its compressed data ends early); copy or export it again.")


def _read_file(path: Path):
    """One image file as a SimpleITK image; a 2D picture SimpleITK cannot read (e.g. a PNG with an
    alpha channel on gray, or a palette) is read with Pillow: gray stays gray, colour becomes RGB.
    Raises RuntimeError when neither can read it."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if _suffix(path) not in IMAGE_2D_SUFFIXES:
            raise
        first_error = exc
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if picture.mode in ("LA", "La", "1"):
                picture = picture.convert("L")
            elif picture.mode in ("P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
                picture = picture.convert("RGB")
            array = np.asarray(picture)
    except (OSError, UnidentifiedImageError, ValueError):
        raise first_error from None
    return sitk.GetImageFromArray(array, isVector=array.ndim == 3)


def load_image(path: str | Path, series: str | None = None, gate: FileGate | None = None) -> LoadedImage:
    """Read a 2D image, a 3D volume or a DICOM series folder, checking it is usable.  ``gate`` (the
    worker's): every file the read opens -- the file, a DICOM series' files, a header's data files --
    is checked by it first (:mod:`.file_access`)."""
    import SimpleITK as sitk

    path = parse_user_path(path, "input path")
    if gate is not None:
        path = gate.check(path)
    if not path.exists():
        raise InputError(f"No such file or folder: {path}")
    if path.is_dir():
        image, series = _read_dicom_series(path, series, gate)
    else:
        if series is not None:
            raise InputError(f"--series picks one DICOM series in a folder, but {path.name} is a file. Give the "
                             f"folder that holds the series, or leave --series out.")
        suffix = _suffix(path)
        if suffix not in IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES + (".dcm", ""):
            raise InputError(f"Unsupported file type '{suffix}' ({path.name}). Use NIfTI, NRRD, MHA, a DICOM "
                             f"folder, or a PNG/JPEG/BMP/TIFF image.")
        _check_before_reading(path, path.name, gate)
        try:
            image = _read_file(path)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else ""
            raise InputError(f"Cannot read {path} as an image ({first}). Is the file complete and of the type its "
                             f"name says?") from None
        _check_whole(path, path.name, image)
    dim = image.GetDimension()
    comps = image.GetNumberOfComponentsPerPixel()
    if dim == 4:
        raise InputError(f"{path.name} is a 4D image (a time series?); extract one 3D volume first.")
    if dim not in (2, 3):
        raise InputError(f"{path.name} has {dim} dimensions; 2D images and 3D volumes are supported.")
    if dim == 3 and comps != 1:
        raise InputError(f"{path.name} is a vector volume ({comps} components per voxel); give a scalar volume.")
    if dim == 2 and comps not in (1, 3, 4):
        raise InputError(f"{path.name} has {comps} channels per pixel; give a grayscale or RGB image.")
    array = sitk.GetArrayFromImage(image)
    if dim == 2 and comps == 4:
        array = array[:, :, :3]
    if array.size == 0 or min(image.GetSize()) < 1:
        raise InputError(f"{path.name} is empty.")
    if min(image.GetSize()[:2]) < 2:
        raise InputError(f"{path.name} is too small to segment ({'x'.join(map(str, image.GetSize()))}).")
    if np.issubdtype(array.dtype, np.floating):
        bad = int((~np.isfinite(array)).sum())
        if not bad and not path.is_dir() and reader_for(path) == "NiftiImageIO":
            bad = nifti_nonfinite_voxels(path)  # ITK has made them 0: counted in the file
        if bad:
            raise InputError(f"{path.name} has {bad} NaN or infinite voxels; replace them (e.g. with the background "
                             f"value) before segmenting.")
    if array.min() == array.max():
        raise InputError(f"{path.name} is constant (every value is {array.flat[0]}): there is nothing to segment.")
    if dim == 2 and array.dtype != np.uint8 and array.ndim == 3:
        raise InputError(f"{path.name} is a colour image with {array.dtype} channels; save it as 8-bit RGB.")
    return LoadedImage(image, dim, array, str(path), series)


def save_mask(mask: np.ndarray, like: LoadedImage, path: str | Path, make_folder: bool = True) -> Path:
    """Write ``mask`` (same array shape as ``like``'s pixels, without colour) with ``like``'s geometry.

    PNG/TIFF/BMP outputs hold 0/255; volume formats hold a 0/1 label map.  Written through
    :func:`~.durable.atomic_output` (read back before it takes the final name); the folder is
    created if needed unless ``make_folder`` is False (then a vanished folder is an error).
    OutputError (one sentence) when it cannot be written whole.
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    suffix = check_mask_format(path)
    mask = np.asarray(mask, dtype=bool)
    expected = like.array.shape[:2] if like.dim == 2 else like.array.shape
    if mask.shape != tuple(expected):
        raise ValueError(f"Mask shape {mask.shape} does not match the image {tuple(expected)}.")
    if like.dim == 3 and suffix in IMAGE_2D_SUFFIXES:
        raise InputError(f"A 3D mask cannot be written as {suffix}; use .nii.gz, .nrrd or .mha.")
    scale = 255 if suffix in IMAGE_2D_SUFFIXES else 1
    out = sitk.GetImageFromArray(mask.astype(np.uint8) * scale)
    ref = like.image
    out.SetSpacing(ref.GetSpacing())
    out.SetOrigin(ref.GetOrigin())
    out.SetDirection(ref.GetDirection())
    expected_pixels = sitk.GetArrayViewFromImage(out)

    def reads_back(written: Path) -> bool:
        """The file as written holds exactly the mask (a full disk can leave a cut-off file that the
        writer did not report), and a .nii.gz is whole to its last byte."""
        try:
            again = sitk.ReadImage(str(written))
        except RuntimeError:
            return False
        if _suffix(written) == ".nii.gz" and not gzip_nifti_is_whole(written, again):
            return False
        return bool(np.array_equal(sitk.GetArrayViewFromImage(again), expected_pixels))

    # a header with a separate data file (.mhd, .nhdr) names that file inside: both are written under
    # their final names in a temporary folder, and moved into place data first
    with atomic_output(path, "the mask", verify=reads_back, make_folder=make_folder,
                       detached=suffix in (".mhd", ".nhdr")) as tmp:
        with native_stderr_held():
            sitk.WriteImage(out, str(tmp), True)
    return path


def _labels_held(array: np.ndarray) -> str:
    """'it holds labels 1, 2, 3 (41 in all)' -- for messages about a label map."""
    present = [v for v in np.unique(array).tolist() if v != 0]
    if not present:
        return "it is empty"
    shown = ", ".join(f"{v:g}" for v in present[:10])
    return f"it holds {'label' if len(present) == 1 else 'labels'} {shown}" + (
        f" ({len(present)} in all)" if len(present) > 10 else "")


def check_mask_format(path: Path) -> str:
    """The lower-case ending of a mask file name, if masks can be written that way (lossless)."""
    suffix = _suffix(Path(path))
    if suffix in (".jpg", ".jpeg"):
        raise InputError("JPEG would blur the mask's edges (lossy); write it as .png, or .nii.gz for a volume.")
    if suffix not in IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES:
        raise InputError(f"Cannot write a mask as '{suffix or Path(path).name}'; use .nii.gz, .nrrd, .mha or, for "
                         f"2D, .png.")
    return suffix


def load_mask(path: str | Path, values: list | None = None, like: LoadedImage | None = None,
              gate: FileGate | None = None, one_target: bool = False) -> np.ndarray:
    """A reference mask as bool: pixels equal to one of ``values``, or any non-zero pixel.

    With ``like``, the mask must have the same size (and, for volumes, the same
    geometry within 1e-3) as that image.  ``gate``: as for :func:`load_image`.
    ``one_target`` (a person named this file and label for one target): the label must occur,
    and without ``values`` a volume's mask must hold a single label.
    """
    import SimpleITK as sitk

    if one_target and values and 0 in values:  # said before anything is read
        raise InputError("Label 0 is the background; give the target's label value (--label V; \"labels\": [V] "
                         "when opening a worker session).")
    path = parse_user_path(path, "mask path")
    if gate is not None:
        path = gate.check(path)
    if path.is_dir():
        raise InputError(f"The mask {path} is a folder; give the mask's file.")
    if not path.is_file():
        raise InputError(f"Mask file not found: {path}")
    _check_before_reading(path, f"The mask {path.name}", gate)
    try:
        image = _read_file(path)
    except RuntimeError:
        raise InputError(f"Cannot read the mask {path}.") from None
    _check_whole(path, f"The mask {path.name}", image)
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array[..., 0]
    if like is not None:
        ref = like.image
        if tuple(image.GetSize()) != tuple(ref.GetSize()):
            raise InputError(f"Mask {path.name} is {'x'.join(map(str, image.GetSize()))} but its image is "
                             f"{'x'.join(map(str, ref.GetSize()))}.")
        if like.dim == 3:
            for what, a, b in (("spacing", image.GetSpacing(), ref.GetSpacing()),
                               ("origin", image.GetOrigin(), ref.GetOrigin()),
                               ("direction", image.GetDirection(), ref.GetDirection())):
                if not np.allclose(a, b, atol=1e-3):
                    raise InputError(f"Mask {path.name} and its image differ in {what}: {np.round(a, 3).tolist()} "
                                     f"vs {np.round(b, 3).tolist()}.")
    if values:
        chosen = np.isin(array, list(values))
        if one_target and not chosen.any():
            raise InputError(f"No voxel of {path.name} has the label {' or '.join(map(str, values))}; "
                             f"{_labels_held(array)}.")
        return chosen
    if one_target and not array.any():
        raise InputError(f"{path.name} is empty (every pixel is 0): there is no target in it to compare with or to "
                         f"follow.")
    if one_target and like is not None and like.dim == 3 and len(np.unique(array[array != 0])[:2]) > 1:
        raise InputError(f"{path.name} holds more than one value ({_labels_held(array)}): say which label is the "
                         f"target (--label V; \"labels\": [V] when opening a worker session).")
    return array != 0
