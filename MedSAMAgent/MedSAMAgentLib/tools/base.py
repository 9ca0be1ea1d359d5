"""The protocol every segmentation tool follows, and the image cache they share.

A tool works in two steps:

1. ``prepare(images)`` -- H x W x 3 ``uint8`` RGB images in, one key each out.
   The heavy part (an image encoder) runs here, once per distinct image; keys
   are content hashes, so preparing the same pixels again costs nothing.  The
   images may be read-only views (the worker passes a grayscale slice broadcast
   to three channels): a tool never writes into them, and copies only what it encodes.
2. ``segment(key, prompts, previous)`` -- prompts in pixel index coordinates
   (:class:`~MedSAMAgentLib.actions.PixelBox`, :class:`~MedSAMAgentLib.actions.PixelPoint`;
   every prompt of the episode so far, oldest first) plus the ``state`` the
   previous turn returned (SAM2: its 1 x 256 x 256 low-res logits) -> a
   :class:`ToolResult` with a boolean mask at the image's own resolution.
   Which of the prompts a tool uses is its own documented policy (its prompt mode);
   ``prompt_mode="cumulative"`` asks for every prompt at once (a user's edited
   prompt set, with ``previous=None``, gives the mask of exactly that set).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..actions import Prompt


class ToolError(RuntimeError):
    """A tool could not be built or used (bad config, checkpoint, device, prompts)."""


class NotPrepared(ToolError):
    """The image behind a key is not in the tool's cache (never prepared, or evicted): prepare it again."""


@dataclass
class ToolResult:
    """One turn's output: ``mask`` (H x W bool, image resolution), ``state`` for the
    next turn (tool-specific, e.g. SAM2 low-res logits 1 x 256 x 256 float32),
    ``score`` (the tool's own quality estimate, NaN when it has none)."""

    mask: np.ndarray
    state: Any = None
    score: float = float("nan")


@runtime_checkable
class SegmentationTool(Protocol):
    name: str
    concurrent_safe: bool  # True: calls may run from several threads at once (CPU tools without shared state)

    def prepare(self, images: Sequence[np.ndarray], keys: Sequence[str | None] | None = None) -> list[str]:
        """Encode each distinct image once; return one cache key per image.

        ``keys``: names the caller gives the images (it vouches that one name is one picture,
        e.g. a session's slice), saving the content hash; None (or a None entry) hashes."""

    def segment(self, key: str, prompts: Sequence[Prompt], previous: Any = None, *,
                prompt_mode: str | None = None) -> ToolResult:
        """Mask for the prepared image ``key`` from the prompts and the previous turn's state."""

    def release(self, key: str) -> None:
        """Forget a prepared image (frees its embedding)."""


def prepare_keys(images: Sequence[np.ndarray], keys: Sequence[str | None] | None) -> list[str]:
    """The cache key of each image: the caller's name for it, else its content hash."""
    if keys is not None and len(keys) != len(images):
        raise ToolError(f"prepare() got {len(keys)} keys for {len(images)} images.")
    return [image_key(im) if keys is None or keys[i] is None else str(keys[i]) for i, im in enumerate(images)]


def image_key(image: np.ndarray) -> str:
    """Content hash of an image (shape, dtype and pixels)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((image.shape, str(image.dtype))).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def check_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as an array, after checking it is H x W x 3 uint8.  Not copied: it may be a
    read-only or strided view (a grayscale slice broadcast to three channels); a tool copies it
    (``np.ascontiguousarray``) only when it has to encode it."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ToolError(f"Tools take H x W x 3 uint8 RGB images, got {image.dtype} {image.shape}.")
    return image


class PreparedCache:
    """Least-recently-used store of prepared images (key -> whatever the tool keeps)."""

    def __init__(self, capacity: int = 32):
        self.capacity = max(1, int(capacity))  # as asked; a batch larger than this is kept whole (reserve)
        self.reserved = 0  # the size of the latest batch prepared
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0  # how many times an image had to be prepared (encoded)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Any:
        with self._lock:
            if key not in self._items:
                raise NotPrepared("This image was not prepared (or was evicted from the cache); call prepare() first.")
            self._items.move_to_end(key)
            return self._items[key]

    def reserve(self, count: int) -> None:
        """Make room for a batch of ``count`` images, so it never evicts its own images; the room
        shrinks back to ``capacity`` once smaller batches follow (a big batch does not raise the
        memory kept for good)."""
        with self._lock:
            self.reserved = int(count)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.misses += 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > max(self.capacity, self.reserved):
                self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)
