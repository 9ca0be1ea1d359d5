import numpy as np
import pytest

from MedSAMAgentLib.actions import Box, Point, Stop
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.policies import create_policy
from MedSAMAgentLib.policies.base import Observation, PolicyError
from MedSAMAgentLib.policies.expert import ExpertConfig, ExpertPolicy, corrective_click, deepest_point
from MedSAMAgentLib.tools import create_tool

from conftest import synthetic_case


@pytest.mark.parametrize("first_action", ["box", "point"])
def test_expert_with_classical_tool_reaches_dice_09_within_5_turns(first_action):
    episodes = [Episode(f"case{i}", *synthetic_case(i)[:1], target="shape", reference=synthetic_case(i)[1])
                for i in range(12)]
    expert = create_policy("expert", first_action=first_action, box_jitter=0.1, seed=1)
    trajectories = Agent(expert, create_tool("classical"), max_turns=5).run(episodes)
    finals = [t.final_dice for t in trajectories]
    assert all(len(t.steps) <= 5 for t in trajectories)
    assert np.mean(finals) >= 0.9 and min(finals) >= 0.8, finals
    if first_action == "point":  # a single click rarely suffices: corrective clicks must have helped
        assert any(t.num_actions > 1 and t.dice_per_turn[-1] > t.dice_per_turn[0] for t in trajectories)


def test_corrective_click_targets_the_larger_error_region():
    ref = np.zeros((50, 50), bool)
    ref[10:40, 10:40] = True
    mask = np.zeros_like(ref)
    mask[10:40, 10:25] = True  # the right half is missed
    x, y, positive = corrective_click(mask, ref)
    assert positive and 25 <= x < 40 and 10 <= y < 40
    mask = ref.copy()
    mask[0:8, 0:50] = True  # extra strip on top
    x, y, positive = corrective_click(mask, ref)
    assert not positive and y < 8
    assert corrective_click(ref, ref) is None
    assert deepest_point(ref) in {(24, 24), (25, 25), (24, 25), (25, 24)}


def test_expert_is_reproducible_and_stops_as_documented():
    ref = np.zeros((100, 120), bool)
    ref[20:70, 30:90] = True
    expert = ExpertPolicy(ExpertConfig(box_jitter=0.2, seed=7, iou_target=0.9))
    obs = Observation("e", "t", 0, reference=ref)
    a, b = expert.decide(obs), expert.decide(obs)
    assert a == b and isinstance(a, Box)
    assert ExpertPolicy(box_jitter=0.2, seed=8).decide(obs) != a
    assert isinstance(expert.decide(Observation("e", "t", 1, masks=[ref], reference=ref)), Stop)
    half = ref.copy()
    half[:, 60:] = False
    assert isinstance(expert.decide(Observation("e", "t", 1, masks=[half], reference=ref)), Point)
    # a click that did not improve IoU: stop
    assert isinstance(expert.decide(Observation("e", "t", 2, masks=[half, half], reference=ref)), Stop)
    assert isinstance(expert.decide(Observation("e", "t", 0, reference=np.zeros_like(ref))), Stop)
    with pytest.raises(PolicyError, match="reference"):
        expert.decide(Observation("e", "t", 0))
    with pytest.raises(PolicyError, match="first_action"):
        ExpertPolicy(first_action="lasso")
