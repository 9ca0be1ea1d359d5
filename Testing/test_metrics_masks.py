import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from MedSAMAgentLib.masks import decode_rle, encode_rle
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


def test_rle_is_compact_and_checked():
    mask = np.zeros((512, 512), bool)
    mask[100:300, 50:400] = True
    assert len(encode_rle(mask)["counts"]) == 401
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [2, 2], "counts": [1, 1]})
