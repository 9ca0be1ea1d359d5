"""SAM2.1 hiera-tiny built from the sam2 package's config, random weights, on CPU."""
import numpy as np
import pytest
import torch

from MedSAMAgentLib.actions import PixelBox, PixelPoint
from MedSAMAgentLib.tools import SegmentationTool, ToolError, create_tool
from MedSAMAgentLib.tools.sam2_tool import Sam2Tool, resolve_config


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (200, 300, 3), dtype=np.uint8)
    img[50:150, 80:220] += 150
    return img


def test_shapes_and_embedding_reused_across_turns(sam2_tool, image):
    assert isinstance(sam2_tool, SegmentationTool) and sam2_tool.image_size == 1024
    misses = sam2_tool.cache.misses
    key, = sam2_tool.prepare([image])
    assert sam2_tool.cache.misses == misses + 1
    first = sam2_tool.segment(key, [PixelBox(80, 50, 220, 150)])
    assert first.mask.shape == (200, 300) and first.mask.dtype == bool
    assert first.state.shape == (1, 256, 256) and first.state.dtype == np.float32
    assert np.isfinite(first.score)
    second = sam2_tool.segment(key, [PixelBox(80, 50, 220, 150), PixelPoint(100, 100, True)], first.state)
    assert second.mask.shape == (200, 300)
    assert sam2_tool.prepare([image.copy()]) == [key]  # same pixels: no second encoding
    assert sam2_tool.cache.misses == misses + 1


def reference_predict(tool, image, **kwargs):
    """The same call straight through SAM2ImagePredictor (set_image + predict)."""
    tool.predictor.set_image(image)
    masks, scores, logits = tool.predictor.predict(multimask_output=tool.multimask, **kwargs)
    tool.predictor.reset_predictor()
    best = int(np.argmax(scores))
    return masks[best] > 0, logits[best][None]


def test_released_mode_sends_only_the_newest_prompt_plus_previous_logits(sam2_tool, image):
    key, = sam2_tool.prepare([image])
    box, click = PixelBox(80, 50, 220, 150), PixelPoint(100, 90, False)
    first = sam2_tool.segment(key, [box])
    ref_mask, ref_logits = reference_predict(sam2_tool, image, box=np.array([80, 50, 220, 150], np.float32))
    assert np.array_equal(first.mask, ref_mask) and np.allclose(first.state, ref_logits, atol=1e-5)
    second = sam2_tool.segment(key, [box, click], first.state)
    ref_mask, ref_logits = reference_predict(sam2_tool, image, point_coords=np.array([[100, 90]], np.float32),
                                             point_labels=np.array([0]), mask_input=first.state)
    assert np.array_equal(second.mask, ref_mask) and np.allclose(second.state, ref_logits, atol=1e-5)


def test_cumulative_mode_sends_box_and_every_click(image):
    tool = create_tool("sam2", config="tiny", device="cpu", prompt_mode="cumulative", multimask=True)
    key, = tool.prepare([image])
    prompts = [PixelBox(80, 50, 220, 150), PixelPoint(100, 90, False), PixelPoint(150, 100, True)]
    assert tool.select_prompts(prompts) == (prompts[0], prompts[1:])
    first = tool.segment(key, prompts[:1])
    out = tool.segment(key, prompts, first.state)
    ref_mask, _ = reference_predict(tool, image, box=np.array([80, 50, 220, 150], np.float32),
                                    point_coords=np.array([[100, 90], [150, 100]], np.float32),
                                    point_labels=np.array([0, 1]), mask_input=first.state)
    assert np.array_equal(out.mask, ref_mask)


def test_several_images_in_one_encoder_batch(sam2_tool, image):
    other = np.ascontiguousarray(image[::-1])
    k1, k2 = sam2_tool.prepare([image, other], [None, "slice:2"])  # one hashed, one named by the caller
    single, _ = reference_predict(sam2_tool, other, box=np.array([80, 50, 220, 150], np.float32))
    batched = sam2_tool.segment(k2, [PixelBox(80, 50, 220, 150)])
    assert k2 == "slice:2" and k1 != k2 and (batched.mask == single).mean() > 0.999
    # each cached image holds its own features, not a view of the whole batch's (which would keep
    # the batch's memory until its last image is evicted)
    feats, _ = sam2_tool.cache.get(k2)
    embed = feats["image_embed"]
    assert embed.untyped_storage().nbytes() == embed.numel() * embed.element_size()


def test_a_large_batch_does_not_raise_the_memory_kept_for_good():
    from MedSAMAgentLib.tools.base import PreparedCache

    cache = PreparedCache(2)
    cache.reserve(4)  # a batch of four is kept whole while it runs
    for k in "abcd":
        cache.put(k, k)
    assert all(k in cache for k in "abcd")
    cache.reserve(1)  # later, smaller batches: back to the two asked for
    cache.put("e", "e")
    assert [k for k in "abcde" if k in cache] == ["d", "e"]


def test_checkpoints_load_as_tensors_only(sam2_tool, tmp_path):
    good = tmp_path / "weights.pt"
    state = {k: v.clone() + 0.5 for k, v in sam2_tool.model.state_dict().items()}
    torch.save({"model": state}, good)
    tool = Sam2Tool(config="tiny", checkpoint=good, device="cpu")
    name = next(iter(state))
    assert torch.equal(tool.model.state_dict()[name], state[name])

    class Payload:  # an object whose unpickling would run code
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(ToolError, match="plain tensors"):
        Sam2Tool(config="tiny", checkpoint=evil, device="cpu")
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"not.a.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ToolError, match="does not fit"):
        Sam2Tool(config="tiny", checkpoint=wrong, device="cpu")
    with pytest.raises(ToolError, match="not found"):
        Sam2Tool(config="tiny", checkpoint=tmp_path / "missing.pt", device="cpu")


def test_configs_and_options_are_checked():
    assert resolve_config("tiny") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert resolve_config("sam2.1_hiera_l") == "configs/sam2.1/sam2.1_hiera_l.yaml"
    with pytest.raises(ToolError, match="Unknown SAM2 config"):
        resolve_config("hiera_gigantic")
    with pytest.raises(ToolError, match="prompt mode"):
        Sam2Tool(prompt_mode="all-at-once", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ToolError, match="no CUDA GPU"):
            Sam2Tool(device="cuda")
