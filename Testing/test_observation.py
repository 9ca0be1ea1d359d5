import numpy as np
import pytest

from MedSAMAgentLib.observation import (CT_WINDOWS, ImageError, Window, apply_window, choose_window, overlay,
                                        percentile_window, resize_mask, resize_rgb, to_display)


def test_ct_presets_map_level_and_width_to_0_255():
    hu = np.array([[-1000, -160, 140, 240, 3000]] * 2, np.int16)
    out = to_display(hu, modality="CT")  # soft tissue: level 40, width 400
    assert out.shape == (2, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 191, 255, 255]
    lung = apply_window(np.array([[-1350.0, -450.0, 150.0]]), choose_window(None, window="lung"))
    assert lung.tolist() == [[0, 153, 255]]
    assert set(CT_WINDOWS) >= {"soft_tissue", "lung", "bone", "brain"}
    assert choose_window(None, window=(50, 100)) == Window(0.0, 100.0)
    with pytest.raises(ImageError, match="Unknown window"):
        choose_window(None, window="kidney stone")
    with pytest.raises(ImageError, match="finite"):
        choose_window(None, window=(float("nan"), float("inf")))


def test_percentile_window_for_mr_and_other_modalities():
    rng = np.random.default_rng(0)
    mr = rng.normal(300, 50, (64, 64)).astype(np.float32)
    mr[0, 0] = 1e6  # one hot voxel must not wash the image out
    out = to_display(mr, modality="MR")
    assert 100 < out[..., 0].mean() < 160
    assert out[0, 0, 0] == 255


def test_a_large_volumes_window_comes_from_a_sample_without_a_float_copy():
    """Over 16M voxels: every k-th voxel gives the window; integers are used as they are (no
    float copy), giving exactly what their float values give."""
    import tracemalloc

    rng = np.random.default_rng(2)
    volume = rng.normal(100, 300, (70, 512, 512)).astype(np.int16)  # 18M voxels, 36 MB
    tracemalloc.start()
    window = percentile_window(volume)
    extra = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert window == percentile_window(volume.astype(np.float32))
    assert extra < volume.nbytes  # the sample (9M values) sorted as int16: 18 MB, not 9M float64 (72 MB) and more
    whole = np.percentile(volume, (0.5, 99.5))  # the sample's window is the whole volume's, within a unit
    assert abs(window.lo - whole[0]) <= 2 and abs(window.hi - whole[1]) <= 2


def test_8bit_and_rgb_pass_through_unchanged():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(to_display(gray)[..., 1], gray)
    rgb = np.random.default_rng(1).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    assert np.array_equal(to_display(rgb), rgb)
    rgba = np.dstack([rgb, np.full((8, 9), 7, np.uint8)])
    assert np.array_equal(to_display(rgba), rgb)


def test_constant_nan_and_bad_shapes():
    assert to_display(np.full((8, 8), 5.0)).max() == 0
    with_nan = np.array([[np.nan, 0.0, 1.0], [np.inf, -np.inf, 0.5]])
    out = to_display(with_nan)[..., 0]
    assert out[0, 0] == 0 and out[1, 0] == 255 and out[1, 1] == 0
    with pytest.raises(ImageError, match="no finite values"):
        percentile_window(np.full((4, 4), np.nan))
    with pytest.raises(ImageError, match="shape"):
        to_display(np.zeros((4, 4, 4, 4)))
    with pytest.raises(ImageError, match="too small"):
        to_display(np.zeros((1, 40)))


def test_resize_to_policy_size_is_bilinear_without_keeping_aspect():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 150:] = 200
    out = resize_rgb(img, (512, 512))
    assert out.shape == (512, 512, 3)
    assert out[:, :200].max() == 0 and out[:, 320:].min() == 200
    assert 0 < out[0, 256, 0] < 200  # bilinear: the edge is blended
    mask = np.zeros((100, 300), bool)
    mask[10:50, 30:90] = True
    small = resize_mask(mask, (150, 50))
    assert small.shape == (50, 150) and small.dtype == bool and small[15, 30] and not small[40, 100]


def test_overlay_is_exactly_the_contract_blend():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:25] = True
    out = overlay(img, mask)
    expected = (img.astype(np.float64) * 0.5 + np.array([0, 255, 0]) * 0.5).astype(np.uint8)
    assert np.array_equal(out[mask], expected[mask])
    assert np.array_equal(out[~mask], img[~mask])
    assert np.array_equal(overlay(img, mask.astype(np.uint8) * 255), out)  # 8-bit masks: on where > 127
    assert np.array_equal(overlay(img, np.full((20, 30), 127, np.uint8)), img)
    assert np.array_equal(overlay(img, None), img)


def test_windowing_in_place_matches_the_formula_and_leaves_the_input_alone():
    rng = np.random.default_rng(5)
    for dtype in (np.int16, np.uint16, np.float32, np.float64):
        image = (rng.normal(100, 400, (31, 45)) if dtype != np.uint16 else rng.uniform(0, 60000, (31, 45))).astype(dtype)
        if np.issubdtype(dtype, np.floating):
            image[0, :4] = [np.nan, np.inf, -np.inf, 2.5]
        before = image.copy()
        window = Window(-40.0, 260.0)
        scaled = np.nan_to_num((image.astype(np.float64) - window.lo) * (255.0 / (window.hi - window.lo)),
                               nan=0.0, posinf=255.0, neginf=0.0)
        assert np.array_equal(apply_window(image, window), np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
        assert np.array_equal(image, before, equal_nan=True)


def test_policy_frames_are_the_contract_frames_drawn_only_when_looked_at():
    from MedSAMAgentLib.observation import PolicyFrames, policy_base, policy_frame
    from MedSAMAgentLib.profile import Profile

    profile = Profile.load()
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    masks = [rng.random((40, 60)) > 0.5 for _ in range(2)]
    frames = PolicyFrames(rgb, profile)
    for m in masks:
        frames.add_mask(m)
    first = frames.upto(2)
    assert len(frames) == 3 and len(first) == 2 and not frames._rendered  # nothing drawn yet
    base = policy_base(rgb, profile)
    assert np.array_equal(first[0], base) and np.array_equal(first[-1], policy_frame(base, masks[0], profile))
    assert np.array_equal(frames[2], policy_frame(base, masks[1], profile))
    assert [f.shape for f in frames] == [base.shape] * 3 and len(frames[1:]) == 2
    with pytest.raises(IndexError):
        first[2]
