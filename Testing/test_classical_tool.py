import numpy as np
import pytest

from MedSAMAgentLib.actions import PixelBox, PixelPoint
from MedSAMAgentLib.metrics import dice
from MedSAMAgentLib.observation import to_rgb
from MedSAMAgentLib.tools import SegmentationTool, ToolError, create_tool

from conftest import synthetic_case


def bbox(ref):
    ys, xs = np.nonzero(ref)
    return PixelBox(xs.min(), ys.min(), xs.max(), ys.max())


def test_follows_the_protocol_and_segments_from_a_box():
    tool = create_tool("classical")
    assert isinstance(tool, SegmentationTool)
    img, ref = synthetic_case(0)
    key, = tool.prepare([to_rgb(img)])
    result = tool.segment(key, [bbox(ref)])
    assert result.mask.shape == ref.shape and result.mask.dtype == bool
    assert dice(result.mask, ref) > 0.9


def test_deterministic_and_cached():
    tool = create_tool("classical")
    img, ref = synthetic_case(3)
    rgb = to_rgb(img)
    k1, k2 = tool.prepare([rgb, rgb.copy()])
    assert k1 == k2 and tool.cache.misses == 1
    prompts = [bbox(ref), PixelPoint(5, 5, False)]
    a = tool.segment(k1, prompts)
    b = tool.segment(k1, prompts, None)
    assert np.array_equal(a.mask, b.mask)
    fresh = create_tool("classical")
    assert np.array_equal(fresh.segment(fresh.prepare([rgb])[0], prompts).mask, a.mask)


def test_clicks_add_and_remove():
    tool = create_tool("classical")
    img, ref = synthetic_case(1, kind="ellipse")
    key, = tool.prepare([to_rgb(img)])
    ys, xs = np.nonzero(ref)
    start = tool.segment(key, [PixelPoint(float(xs.mean()), float(ys.mean()), True)])
    assert start.mask[int(ys.mean()), int(xs.mean())] and dice(start.mask, ref) > 0.6
    # a negative click where the mask is on turns that spot off
    on_y, on_x = int(ys.mean()), int(xs.mean())
    neg = tool.segment(key, [PixelPoint(float(xs.mean()), float(ys.mean()), True), PixelPoint(on_x + 0.0, on_y + 0.0, False)],
                       start.state)
    assert not neg.mask[on_y, on_x]


def test_constant_image_and_bad_input():
    tool = create_tool("classical")
    key, = tool.prepare([np.full((64, 64, 3), 90, np.uint8)])
    result = tool.segment(key, [PixelBox(10, 10, 40, 40)])
    assert result.mask.shape == (64, 64)
    with pytest.raises(ToolError, match="at least one"):
        tool.segment(key, [])
    with pytest.raises(ToolError, match="RGB"):
        tool.prepare([np.zeros((4, 4), np.uint8)])
    with pytest.raises(ToolError, match="not prepared"):
        tool.segment("nope", [PixelBox(1, 1, 2, 2)])
    with pytest.raises(ToolError, match="Unknown tool"):
        create_tool("grabcut++")


def test_opencv_morphology_is_exactly_scipys():
    """The tool's OpenCV opening, hole filling and depth (which let other threads run) give
    what scipy.ndimage gives, edges included, so its masks did not change with them."""
    from scipy import ndimage

    from MedSAMAgentLib.tools.classical import depth_at, fill_holes, open_cross

    rng = np.random.default_rng(3)
    for n in range(400):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        if n % 2:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 4)))
        assert np.array_equal(open_cross(mask), ndimage.binary_opening(mask)), n
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask)), n
        y, x = int(rng.integers(h)), int(rng.integers(w))
        assert depth_at(mask, x, y) == ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1][y, x], n


def reference_candidate(tool, q, box, target, background):
    """The tool's intensity model written with numpy and scipy.ndimage (as it was first written)."""
    from scipy import ndimage

    from MedSAMAgentLib.tools.classical import fill_holes, open_cross

    h_t = np.bincount(q[target], minlength=tool.bins).astype(float) + 0.5
    h_b = np.bincount(q[background], minlength=tool.bins).astype(float) + 0.5
    h_t = ndimage.gaussian_filter1d(h_t / h_t.sum(), 1.0)
    h_b = ndimage.gaussian_filter1d(h_b / h_b.sum(), 1.0)
    posterior = (h_t[q] / (h_t[q] + h_b[q])).astype(np.float32)
    import cv2

    fg = fill_holes(open_cross((cv2.GaussianBlur(posterior, (0, 0), 1.0) > 0.5) & box))
    labels, n = ndimage.label(fg)
    if n > 1:
        keep = np.unique(labels[target & fg])
        keep = keep[keep > 0]
        if keep.size:
            return np.isin(labels, keep)
        sizes = ndimage.sum(fg, labels, range(1, n + 1))
        return labels == 1 + int(np.argmax(sizes))
    return fg


def test_opencv_intensity_model_is_exactly_the_numpy_one():
    """Histograms, posterior look-up and connected parts through OpenCV (which lets overrides run
    side by side) keep exactly the masks of the numpy/scipy formulation, ties between parts included."""
    tool = create_tool("classical")
    rng = np.random.default_rng(5)
    for n in range(300):
        h, w = (int(v) for v in rng.integers(8, 90, 2))
        q = rng.integers(0, tool.bins, (h, w)).astype(np.uint8)
        for _ in range(3):  # blocks of similar intensity: several parts, some the same size
            y, x = int(rng.integers(h)), int(rng.integers(w))
            q[y:y + int(rng.integers(2, 20)), x:x + int(rng.integers(2, 20))] = rng.integers(0, tool.bins)
        box = np.zeros((h, w), bool)
        y1, x1 = int(rng.integers(h // 2)), int(rng.integers(w // 2))
        box[y1:y1 + int(rng.integers(2, h)), x1:x1 + int(rng.integers(2, w))] = True
        target = box & (rng.random((h, w)) < rng.uniform(0, 0.2)) if n % 3 else np.zeros((h, w), bool)
        background = ~box & (rng.random((h, w)) < 0.5)
        if n % 4 == 0:  # two squares of one size on a plain field, no target samples: the largest part is a tie
            side = int(rng.integers(3, 6))
            q[:] = 3
            q[1:1 + side, 1:1 + side] = q[-1 - side:-1, -1 - side:-1] = 20
            box[:], target[:], background = True, False, q == 3
        assert np.array_equal(tool._candidate(q, box, target, background),
                              reference_candidate(tool, q, box, target, background)), n


def test_images_prepared_under_names_the_caller_gives():
    from MedSAMAgentLib.tools import image_key

    gray, ref = synthetic_case(4)
    rgb = to_rgb(gray)
    tool = create_tool("classical")
    named, hashed = tool.prepare([rgb, rgb[::-1].copy()], ["session:axial:7", None])
    assert named == "session:axial:7" and hashed == image_key(rgb[::-1].copy())
    misses = tool.cache.misses
    assert tool.prepare([rgb], ["session:axial:7"]) == [named] and tool.cache.misses == misses  # kept, not redone
    by_content, = tool.prepare([rgb])
    box = [bbox(ref)]
    assert np.array_equal(tool.segment(named, box).mask, tool.segment(by_content, box).mask)
    with pytest.raises(ToolError, match="2 keys for 1 images"):
        tool.prepare([rgb], ["a", "b"])
