import json

import numpy as np
import pytest

from MedSAMAgentLib.actions import Box, Stop, format_action
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.policies import PolicyError, create_policy
from MedSAMAgentLib.policies.base import Decision
from MedSAMAgentLib.policies.replay import ReplayPolicy
from MedSAMAgentLib.tools import create_tool
from MedSAMAgentLib.trajectory import Trajectory, load_trajectories, save_trajectories

from conftest import synthetic_case


def episode(i, **kw):
    img, ref = synthetic_case(i)
    return Episode(f"ep{i}", img, "shape", ref, **kw)


def test_events_and_trajectory_of_an_expert_episode():
    events = []
    agent = Agent(create_policy("expert", first_action="point"), create_tool("classical"), on_event=events.append)
    traj, = agent.run([episode(2)])
    kinds = [e.kind for e in events]
    assert kinds[0] == "action" and kinds[1] == "mask" and kinds[-1] == "episode_done"
    assert kinds.count("action") == len(traj.steps) and kinds.count("mask") == traj.num_actions
    first_action = next(e for e in events if e.kind == "action")
    assert first_action.data["action"]["name"] == "add_point"
    assert set(first_action.data["pixels"]) == {"point", "positive"}
    mask_event = next(e for e in events if e.kind == "mask")
    assert mask_event.data["mask"].shape == (256, 320) and 0 <= mask_event.data["dice"] <= 1
    assert traj.stop_reason in ("stop", "max_turns") and traj.policy == "expert" and traj.tool == "classical"
    assert traj.profile == "medsam-agent-v1" and traj.image_size == (320, 256)


def test_trajectories_serialize_to_json_and_back(tmp_path):
    trajs = Agent(create_policy("expert"), create_tool("classical")).run([episode(0), episode(1)])
    path = tmp_path / "t.json"
    save_trajectories(trajs, path)
    json.loads(path.read_text(encoding="utf-8"))  # plain JSON
    back = load_trajectories(path)
    for a, b in zip(trajs, back):
        assert a.to_dict() == b.to_dict()
        assert np.array_equal(a.final_mask, b.final_mask)
        assert [s.action for s in a.steps] == [s.action for s in b.steps]
    assert Trajectory.from_json(trajs[0].to_json()).dice_per_turn == trajs[0].dice_per_turn


def test_a_parse_failure_ends_only_its_episode():
    events = []
    policy = ReplayPolicy({"ep0": ["I think it is the liver."], "ep1": [format_action(Box(100, 100, 800, 800))]})
    trajs = Agent(policy, create_tool("classical"), on_event=events.append).run([episode(0), episode(1)])
    bad, good = trajs
    assert bad.stop_reason == "parse_failure" and "no tool call" in bad.failure
    assert bad.steps[0].action is None and bad.num_actions == 0 and not bad.final_mask.any()
    assert good.stop_reason == "stop" and good.num_actions == 1 and good.final_mask.any()
    assert any(e.kind == "error" and e.episode_id == "ep0" for e in events)


class StopsFirst:
    """A policy that answers stop the first time it is asked on turn 0, then a box."""

    name = "stops-first"

    def __init__(self, stops: int):
        self.stops = stops
        self.asked = 0

    def act(self, observations):
        out = []
        for obs in observations:
            if obs.turn == 0:
                self.asked += 1
                action = Stop() if self.asked <= self.stops else Box(100, 100, 900, 900)
            else:
                action = Stop()
            out.append(Decision(format_action(action), action))
        return out


def test_a_first_turn_stop_is_retried_once():
    policy = StopsFirst(stops=1)
    traj, = Agent(policy, create_tool("classical")).run([episode(0)])
    assert policy.asked == 2 and traj.retried_first_stop
    assert [s.action["name"] for s in traj.steps] == ["add_bbox", "stop_action"]
    policy = StopsFirst(stops=5)
    traj, = Agent(policy, create_tool("classical")).run([episode(0)])
    assert policy.asked == 2 and traj.stop_reason == "stop" and traj.num_actions == 0
    assert not traj.final_mask.any()


def test_max_turns_and_replay_of_a_recorded_trajectory():
    clicks = [format_action(Box(200, 200, 800, 800))] + [
        '<tool_call>\n{"name": "add_point", "arguments": {"point_2d": [500, 500], "point_type": "positive"}}\n</tool_call>'] * 9
    traj, = Agent(ReplayPolicy(clicks), create_tool("classical"), max_turns=3).run([episode(4)])
    assert traj.stop_reason == "max_turns" and len(traj.steps) == 3
    again, = Agent(ReplayPolicy.from_trajectories([traj]), create_tool("classical"), max_turns=3).run([episode(4)])
    assert [s.action for s in again.steps] == [s.action for s in traj.steps]
    assert np.array_equal(again.final_mask, traj.final_mask)
    by_name, = Agent(create_policy("replay", actions=clicks), create_tool("classical"), max_turns=3).run([episode(4)])
    assert [s.action for s in by_name.steps] == [s.action for s in traj.steps]
    with pytest.raises(PolicyError, match=r"create_policy\('replay', actions="):
        create_policy("replay")  # said how, not a TypeError about a missing argument


def test_any_2d_array_is_windowed_for_the_policy():
    img, ref = synthetic_case(5)
    hu = img.astype(np.float32) * 4 - 1000  # a float "scanner" image
    traj, = Agent(create_policy("expert"), create_tool("classical")).run([Episode("f", hu, "shape", ref)])
    assert traj.final_dice > 0.8


def test_batches_larger_than_the_tool_cache_and_evicted_images_still_work():
    from MedSAMAgentLib.tools.classical import ClassicalTool

    tool = ClassicalTool(cache_size=2)
    box = format_action(Box(100, 100, 900, 900))
    trajs = Agent(ReplayPolicy([box]), tool, max_turns=1).run([episode(i) for i in range(5)])
    assert [t.stop_reason for t in trajs] == ["max_turns"] * 5 and all(t.final_mask.any() for t in trajs)
    run = Agent(ReplayPolicy([box]), tool, max_turns=1).start([episode(7)])
    tool.release(run.runs[0].key)  # another user's work pushed this image out of the cache
    run.step()
    assert run.trajectories[0].final_mask.any() and run.trajectories[0].failure is None
