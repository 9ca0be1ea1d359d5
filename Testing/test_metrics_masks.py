import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from MedSAMAgentLib.masks import decode_rle, encode_rle, pack_mask, unpack_mask
from MedSAMAgentLib.metrics import dice, iou


def test_dice_and_iou_values_and_empty_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0 and iou(a, b) == 1.0  # both empty: agreement
    b[0, :2] = True
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0  # one empty
    a[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5) and iou(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((3, 3)))


@settings(max_examples=300, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_rle_round_trip(mask):
    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert np.array_equal(decode_rle(rle), mask)


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 13), st.integers(1, 13))))
def test_packed_masks_round_trip(mask):
    assert np.array_equal(unpack_mask(pack_mask(mask)), mask)


def test_a_trajectory_keeps_its_turn_masks_at_one_bit_a_pixel():
    from MedSAMAgentLib.trajectory import Step, Trajectory

    mask = np.zeros((512, 512), bool)
    mask[100:300, 50:400] = True
    step = Step(0, "box", None, mask=mask)
    mask[:] = False  # the step kept its own copy
    bits, shape = step.__dict__["_packed_mask"]
    assert bits.nbytes == 512 * 512 // 8 and shape == (512, 512)
    assert step.mask.dtype == bool and step.mask.sum() == 200 * 350
    traj = Trajectory("e", "t", (512, 512), [step, Step(1, "stop", None)])
    assert traj.num_actions == 1 and traj.final_mask.sum() == 200 * 350
    step.mask = None
    assert traj.num_actions == 0 and not traj.final_mask.any()


def test_rle_is_compact_and_checked():
    mask = np.zeros((512, 512), bool)
    mask[100:300, 50:400] = True
    assert len(encode_rle(mask)["counts"]) == 401
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [2, 2], "counts": [1, 1]})
