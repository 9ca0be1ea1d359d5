"""From scanner intensities to the pictures the policy sees.

* windowing: any 2D array (CT in HU, MR, US, X-ray, ...) -> 8-bit grayscale;
* ``to_rgb``: grayscale or RGB(A) -> H x W x 3 ``uint8``;
* ``resize_rgb`` / ``resize_mask``: to the policy's (or any) size;
* ``overlay``: the current mask blended in green, exactly per the profile.

Arrays are indexed ``[row, column]`` = ``[y, x]``; sizes are given as
``(width, height)`` like PIL.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# CT presets as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_PERCENTILES = (0.5, 99.5)


class ImageError(ValueError):
    """An image the engine cannot turn into a picture (wrong shape, no finite values)."""


@dataclass(frozen=True)
class Window:
    """Intensities ``lo .. hi`` map linearly to ``0 .. 255``; outside is clipped."""

    lo: float
    hi: float

    @classmethod
    def from_level_width(cls, level: float, width: float) -> "Window":
        return cls(level - width / 2.0, level + width / 2.0)


def is_display_ready(image: np.ndarray) -> bool:
    """True for 8-bit grayscale (H x W) or 8-bit colour (H x W x 3/4): no windowing needed."""
    return image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)))


def voxel_sample(image: np.ndarray, limit: int = 1 << 24) -> np.ndarray:
    """The image's values, flat; for a large volume every k-th voxel, at most ``limit`` (16M) of
    them: the same percentiles without a copy of gigabytes (a strided view, not a copy)."""
    values = np.asarray(image).ravel()
    return values if values.size <= limit else values[::values.size // limit + 1]


def percentile_window(image: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> Window:
    """Window from the finite values' percentiles (MR, US, X-ray, unknown modalities).

    Works on a slice or on a whole volume (one window for every slice of a
    volume keeps their brightness consistent).  A constant image gives a window
    one unit wide, so it maps to black instead of dividing by zero.
    """
    values = voxel_sample(image)
    if not np.issubdtype(values.dtype, np.integer):  # integers are all finite: no float copy needed
        values = values[np.isfinite(values)]
    if values.size == 0:
        raise ImageError("The image has no finite values (all NaN or infinite).")
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return Window(float(lo), float(hi))


def choose_window(image: np.ndarray, modality: str | None = None,
                  window: str | tuple[float, float] | Window | None = None) -> Window:
    """The window to use: an explicit one, a CT preset name, or a default per modality.

    ``window`` may be a :class:`Window`, a ``(level, width)`` pair, a preset name from
    :data:`CT_WINDOWS`, ``"percentile"``, or None (CT -> soft tissue, others ->
    percentiles).
    """
    if isinstance(window, Window):
        return window
    if isinstance(window, (tuple, list)):
        level, width = (float(v) for v in window)
        if not (np.isfinite(level) and np.isfinite(width)):
            raise ImageError(f"A window needs finite numbers, got level {level} and width {width}.")
        if width <= 0:
            raise ImageError(f"A window width must be positive, got {width}.")
        return Window.from_level_width(level, width)
    if isinstance(window, str) and window != "percentile":
        key = window.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in CT_WINDOWS:
            raise ImageError(f"Unknown window '{window}'. Choose one of: {', '.join(CT_WINDOWS)}, percentile, or level,width.")
        return Window.from_level_width(*CT_WINDOWS[key])
    if window is None and (modality or "").strip().upper() == "CT":
        return Window.from_level_width(*CT_WINDOWS["soft_tissue"])
    return percentile_window(image)


def apply_window(image: np.ndarray, window: Window) -> np.ndarray:
    """2D array (any dtype) -> ``uint8`` grayscale; NaN and -inf become black, +inf white."""
    # one float64 working copy, changed in place: each fresh temporary of a CT slice's size
    # costs more in page faults than the arithmetic itself
    scaled = np.array(image, dtype=np.float64)
    scaled -= window.lo
    scaled *= 255.0 / (window.hi - window.lo)
    if not np.issubdtype(np.asarray(image).dtype, np.integer):
        np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def to_display(image: np.ndarray, modality: str | None = None,
               window: str | tuple[float, float] | Window | None = None) -> np.ndarray:
    """Any supported 2D image -> H x W x 3 ``uint8`` RGB.

    8-bit grayscale and 8-bit RGB(A) pass through unchanged (alpha dropped) unless
    a window is asked for; anything else is windowed per :func:`choose_window`.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype != np.uint8:
        raise ImageError("Colour images must be 8-bit; convert the image to 8-bit RGB first.")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageError(f"Expected a 2D grayscale or RGB image, got an array of shape {image.shape}.")
    if min(image.shape[:2]) < 2:
        raise ImageError(f"The image is too small ({image.shape[1]}x{image.shape[0]} pixels).")
    if image.ndim == 2 and (window is not None or not is_display_ready(image)):
        image = apply_window(image, choose_window(image, modality, window))
    return to_rgb(image)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """8-bit grayscale (H x W) or RGB(A) -> contiguous H x W x 3 ``uint8``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ImageError("to_rgb expects 8-bit data; window the image first.")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 ``uint8`` -> ``size`` = (width, height), bilinear, aspect ratio not kept."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.BILINEAR))


def letterbox_rgb(image: np.ndarray, side: int) -> np.ndarray:
    """H x W x 3 ``uint8`` -> ``side`` x ``side``, as the authors' evaluation scripts make the policy's picture
    (infer/unibiomed_inference_toolusing.py): PIL's ``thumbnail`` with LANCZOS (it only ever shrinks, keeping
    the aspect ratio), centred on white."""
    picture = Image.fromarray(image)
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(picture, ((side - picture.size[0]) // 2, (side - picture.size[1]) // 2))
    return np.asarray(canvas)


def resize_mask(mask: np.ndarray, size: tuple[int, int], method: str = "bilinear", threshold: int = 127) -> np.ndarray:
    """Boolean H x W mask -> ``size`` = (width, height): the mask as 0/255 8-bit, resized, on where > threshold.

    ``bilinear`` with 127, as the released checkpoint's RL code did (close to nearest neighbour, smoother
    edges); ``nearest`` with 128, as its evaluation scripts do (model_loader.py ``generate_response``).
    """
    mask = np.asarray(mask, dtype=bool)
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    resample = Image.NEAREST if method == "nearest" else Image.BILINEAR
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(tuple(size), resample)) > threshold


def overlay(image: np.ndarray, mask: np.ndarray | None, color=(0, 255, 0), alpha: float = 0.5) -> np.ndarray:
    """Blend ``color`` over the mask: ``out = image*(1-alpha) + color*alpha`` where the mask is on.

    ``image``: H x W x 3 ``uint8``; ``mask``: H x W, bool or 8-bit (on where > 127).
    Pixels outside the mask are unchanged; blended values are truncated to
    ``uint8`` (``astype``), as the released checkpoint's code did.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    if mask is None:
        return out
    mask = np.asarray(mask)
    on = mask if mask.dtype == bool else mask > 127
    if on.shape != out.shape[:2]:
        raise ImageError(f"Mask {on.shape} and image {out.shape[:2]} differ in size.")
    blended = out[on].astype(np.float32) * (1.0 - alpha) + np.asarray(color, np.float32) * alpha
    out[on] = blended.astype(np.uint8)
    return out


def policy_base(rgb: np.ndarray, profile) -> np.ndarray:
    """The plain picture the policy sees first: ``rgb`` at the profile's policy size, stretched (bilinear,
    the RL code) or letterboxed (:func:`letterbox_rgb`, the evaluation scripts) per ``policy_resize``."""
    if profile.policy_resize == "letterbox":  # a square policy size (the profile checks)
        return letterbox_rgb(rgb, profile.policy_image_size[0])
    return resize_rgb(rgb, profile.policy_image_size)


def policy_frame(base: np.ndarray, mask: np.ndarray | None, profile) -> np.ndarray:
    """The picture after an action: ``mask`` (image resolution) overlaid on the policy-size ``base``.

    The one rule for inference and training alike: the mask resized to the whole policy size
    (:func:`resize_mask`, per the profile's ``overlay.resize`` and threshold), then blended per the
    profile's overlay.  (With a letterboxed base the authors' evaluation code stretches the mask over the
    whole square, padding included; so does this, to match.)  ``mask`` None: the base again.
    """
    if mask is None:
        return np.array(base, copy=True)
    on = resize_mask(mask, profile.policy_image_size, profile.overlay_resize, profile.overlay_threshold)
    return overlay(base, on, profile.overlay_color, profile.overlay_alpha)


class PolicyFrames(Sequence):
    """The pictures the policy has been shown in one episode, rendered on first look.

    ``frames[0]`` is :func:`policy_base` of ``rgb``; ``frames[t]`` is
    :func:`policy_frame` of the mask after action ``t-1`` (added with
    :meth:`add_mask`).  A policy that never looks at pictures (replay, expert)
    never pays for them; one that does gets each rendered once.
    :meth:`upto` gives a view fixed at the current length (sharing the renders),
    for one observation.
    """

    def __init__(self, rgb: np.ndarray, profile):
        self._rgb, self._profile = rgb, profile
        self._masks: list = []
        self._rendered: dict[int, np.ndarray] = {}
        self._count: int | None = None  # a view's fixed length; None: every frame so far

    def add_mask(self, mask: np.ndarray | None) -> None:
        """The next frame shows ``mask`` (None: the plain picture again, as a retried first turn does)."""
        self._masks.append(mask)

    def __len__(self) -> int:
        return 1 + len(self._masks) if self._count is None else self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("frame index out of range")
        frame = self._rendered.get(index)
        if frame is None:
            if index == 0:
                frame = policy_base(self._rgb, self._profile)
            else:
                frame = policy_frame(self[0], self._masks[index - 1], self._profile)
            self._rendered[index] = frame
        return frame

    def upto(self, count: int | None = None) -> "PolicyFrames":
        view = PolicyFrames.__new__(PolicyFrames)
        view.__dict__.update(self.__dict__)  # the same masks and renders, shared
        view._count = len(self) if count is None else count
        return view
