import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from MedSAMAgentLib.profile import Profile, ProfileError

from conftest import SHARED

# sha256 of the contract's system prompt (shared/contract/medsam-agent-v1.json), so the
# check also runs where the contract file is not beside the checkout.
CONTRACT_SYSTEM_SHA256 = "9238cf9e4a4b8425c93dde532d22c5f8df1e10e50932eaefdd6b967b84c07a61"


def test_system_prompt_is_the_contract_byte_for_byte():
    profile = Profile.load()
    assert hashlib.sha256(profile.system_prompt.encode("utf-8")).hexdigest() == CONTRACT_SYSTEM_SHA256
    contract_file = SHARED / "contract" / "medsam-agent-v1.json"
    if contract_file.is_file():
        contract = json.loads(contract_file.read_text(encoding="utf-8"))
        assert profile.system_prompt == contract["system_prompt"]
        assert list(profile.tools) == contract["tools"]
        assert profile.first_user_text == contract["first_user_turn"]["text"]
        assert profile.later_user_text == contract["later_user_turn"]["text"]
        assert list(profile.policy_image_size) == contract["policy_image"]["size"]
        assert profile.max_turns == contract["max_turns"]


def test_tool_schemas_are_the_ones_embedded_in_the_system_prompt():
    profile = Profile.load()
    assert [t["function"]["name"] for t in profile.tools] == ["add_bbox", "add_point", "stop_action"]
    for tool in profile.tools:
        assert "\n" + json.dumps(tool) + "\n" in profile.system_prompt


def test_messages_alternate_with_image_then_text():
    profile = Profile.load()
    images = [Image.new("RGB", (512, 512)) for _ in range(3)]
    msgs = profile.build_messages("liver", images, ["a", "b"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == [{"type": "text", "text": profile.system_prompt}]
    first, later = msgs[1]["content"], msgs[3]["content"]
    assert [p["type"] for p in first] == ["image", "text"] and [p["type"] for p in later] == ["image", "text"]
    assert first[1]["text"] == "The target to be segmented is: liver.\nNow, please analyze the original image, then decide your first action."
    assert later[1]["text"] == profile.later_user_text and msgs[5]["content"][0]["image"] is images[2]
    assert msgs[4]["content"] == [{"type": "text", "text": "b"}]
    full = profile.build_messages("liver", images[:2], ["a", "b"])
    assert full[-1]["role"] == "assistant"
    with pytest.raises(ValueError):
        profile.build_messages("liver", images, ["a"] * 5)


def test_rendered_conversation_carries_the_exact_system_prompt_and_order(tiny_qwen_dir):
    from transformers import AutoProcessor

    profile = Profile.load()
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    img = Image.fromarray(np.zeros((512, 512, 3), np.uint8))
    text = processor.apply_chat_template(profile.build_messages("spleen", [img, img], ["X"]),
                                         tokenize=False, add_generation_prompt=True)
    system_block = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    assert system_block == profile.system_prompt
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert user == "<|vision_start|><|image_pad|><|vision_end|>" + profile.user_text(0, "spleen")
    assert text.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                         + profile.later_user_text + "<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_profile_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="Known profiles: medsam-agent-v1"):
        Profile.load("nope")
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(bad)


def test_profile_round_trips_through_dict():
    p = Profile.load()
    assert Profile.from_dict(p.to_dict()) == p


def test_a_profile_cannot_change_what_the_engine_has_built_in():
    """The grid range, the overlay threshold and the tool's image side are fixed in the engine: a
    profile that sets other values is refused, not silently run with the built-in ones."""
    base = Profile.load().to_dict()
    for change, field in (({"grid_max": 499}, "grid_max"), ({"tool_image_size": 512}, "tool_image_size"),
                          ({"overlay": {**base["overlay"], "threshold": 200}}, "overlay.threshold")):
        with pytest.raises(ProfileError, match=field):
            Profile.from_dict({**base, **change})


def test_a_malformed_profile_names_the_field_and_what_it_should_be():
    base = Profile.load().to_dict()
    for change, message in (({"max_turns": None}, "max_turns is null, not a whole number"),
                            ({"max_turns": -3}, "max_turns = -3; it must be at least 1"),
                            ({"policy_image_size": [1, 2, 3]}, r"policy_image_size is \[1, 2, 3\], not two whole"),
                            ({"overlay": None}, "JSON object"),
                            ({"overlay": {**base["overlay"], "alpha": "x"}}, "overlay.alpha is \"x\", not a number"),
                            ({"tools": "x"}, "tools are a list"),
                            ({"first_user_text": None}, "are texts")):
        with pytest.raises(ProfileError, match=message):
            Profile.from_dict({**base, **change})
    with pytest.raises(ProfileError, match="has no name"):
        Profile.from_dict({k: v for k, v in base.items() if k != "name"})
    with pytest.raises(ProfileError, match="JSON object"):
        Profile.from_dict([])
