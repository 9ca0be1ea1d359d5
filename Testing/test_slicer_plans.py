"""The Slicer module's decisions, without Slicer: the event-to-markup plan, the override and processing
state machines, the undo history, the audit trail, dependencies, launch options, downloads, replay files."""
import json
import sys
import threading
import time

import numpy as np
import pytest

from MedSAMAgentLib import models
from MedSAMAgentLib.masks import decode_rle, encode_rle
from MedSAMAgentLib.policies.base import Observation
from MedSAMAgentLib.policies.replay import ReplayPolicy
from MedSAMAgentLib.slicer_support import dependencies as deps
from MedSAMAgentLib.slicer_support import processing as P
from MedSAMAgentLib.slicer_support.audit import AuditEntry, AuditLog
from MedSAMAgentLib.slicer_support.downloads import DownloadJob
from MedSAMAgentLib.slicer_support.geometry import VolumeGeometry
from MedSAMAgentLib.slicer_support.markup_plan import (
    AddBox,
    AddPoint,
    BeginUndoStep,
    ClearSliceMarkups,
    MarkupPlanner,
    RunFinished,
    ShowStatus,
    WriteMaskSlice,
    markup_description,
    parse_description,
)
from MedSAMAgentLib.slicer_support.options import (
    CLASSICAL,
    LOCAL,
    REPLAY,
    Launch,
    LaunchError,
    download_prompt,
    missing_models,
    needed_models,
    policy_choices,
    tool_choices,
)
from MedSAMAgentLib.slicer_support.override import (
    EDITING,
    ERROR,
    IDLE,
    RECOMPUTING,
    SHOWN,
    OverrideManager,
    PromptItem,
    box_item,
    by_slice,
    point_item,
)
from MedSAMAgentLib.slicer_support.replay import write_replay
from MedSAMAgentLib.slicer_support.undo import UndoStack
from MedSAMAgentLib.trajectory import load_trajectories

# an oblique volume: 40 x 30 pixels per axial slice, 6 slices
M = np.eye(4)
_c, _s = np.cos(np.radians(20)), np.sin(np.radians(20))
M[:3, :3] = np.array([[-_c, -_s, 0], [-_s, _c, 0], [0, 0, 1]]) * [0.8, 0.8, 2.0]
M[:3, 3] = (10, -20, 30)
GEOMETRY = VolumeGeometry(M, (40, 30, 6))
H, W = GEOMETRY.slice_shape("axial")


def ev(type_, run="r1", **data):
    return {"type": type_, "run": run, "seq": 0, **data}


def box_event(slice_, turn, box=(5.0, 4.0, 30.0, 20.0), run="r1"):
    return ev("action", run, axis="axial", slice=slice_, turn=turn, actor="agent", text="...",
              action={"name": "add_bbox", "arguments": {"bbox_2d": [100, 100, 800, 700]}}, pixels={"box": list(box)})


def point_event(slice_, turn, x, y, positive, run="r1"):
    return ev("action", run, axis="axial", slice=slice_, turn=turn, actor="agent", text="...",
              action={"name": "add_point", "arguments": {"point_2d": [500, 500],
                                                          "point_type": "positive" if positive else "negative"}},
              pixels={"point": [x, y], "positive": positive})


def mask_event(slice_, turn, mask, run="r1"):
    return ev("mask", run, axis="axial", slice=slice_, turn=turn, mask=encode_rle(mask), score=0.9)


def blob(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------- the event-to-markup plan
def test_each_agent_action_is_one_undo_step_with_its_markup_in_the_slice_plane():
    planner = MarkupPlanner(GEOMETRY)
    assert isinstance(planner.plan(ev("run_started", axis="axial", target="liver", slices=[2, 3]))[0], ShowStatus)
    out = planner.plan(box_event(2, 0))
    # a fresh run replaces the slice, in an undo step of its own (undoing it brings the old prompts back)
    assert [type(i) for i in out] == [BeginUndoStep, ClearSliceMarkups, BeginUndoStep, AddBox]
    assert "new run" in out[0].label and (out[0].axis, out[0].slice) == ("axial", 2)
    out = out[1:]
    box = out[2]
    assert (out[1].axis, out[1].slice) == ("axial", 2) and box.label == "s2-t1" and box.author == "agent"
    centre = np.array(box.object_to_ras)[:3, 3]
    assert np.allclose(centre, GEOMETRY.pixel_to_ras("axial", 2, 17.5, 12.0))
    assert GEOMETRY.ras_to_pixel("axial", centre)[2] == pytest.approx(2)
    assert box.size[0] == pytest.approx(25 * 0.8) and box.size[2] == pytest.approx(2.0)

    out = planner.plan(point_event(2, 1, 10.0, 8.0, True))
    assert [type(i) for i in out] == [BeginUndoStep, AddPoint]  # the slice was already cleared for this run
    assert out[1].positive and out[1].label == "s2-t2"
    assert np.allclose(out[1].position_ras, GEOMETRY.pixel_to_ras("axial", 2, 10.0, 8.0))
    neg = planner.plan(point_event(3, 2, 1.0, 2.0, False))[-1]
    assert not neg.positive and neg.label == "s3-t3"


def test_masks_are_written_slice_by_slice_only_when_they_change():
    planner = MarkupPlanner(GEOMETRY)
    planner.plan(ev("run_started", axis="axial", target="liver", slices=[2]))
    planner.plan(box_event(2, 0))
    first = blob(5, 4, 30, 20)
    out = planner.plan(mask_event(2, 0, first))
    assert len(out) == 1 and isinstance(out[0], WriteMaskSlice)
    write = out[0]
    assert write.voxels == first.sum() and write.extent[4] == write.extent[5] == 2  # slice 2 of K only
    seg = np.zeros((6, 30, 40), np.uint8)
    i0, i1, j0, j1, k0, k1 = write.extent
    seg[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = write.block
    assert np.array_equal(GEOMETRY.read_slice(seg, "axial", 2).astype(bool), first)
    assert planner.plan(mask_event(2, 1, first)) == []  # a click that changed nothing writes nothing
    done = ev("slice_done", axis="axial", slice=2, stop_reason="stop", failure=None, mask=encode_rle(first), turns=3)
    assert planner.plan(done) == []
    assert isinstance(planner.plan(ev("run_done", status="done"))[0], RunFinished)


def test_a_slice_the_agent_stops_on_at_once_is_cleared_and_written_empty():
    planner = MarkupPlanner(GEOMETRY)
    planner.plan(ev("run_started", axis="axial", target="liver", slices=[4]))
    stop = ev("action", axis="axial", slice=4, turn=0, action={"name": "stop_action", "arguments": {}}, pixels=None)
    out = planner.plan(stop)
    assert isinstance(out[0], BeginUndoStep) and isinstance(out[1], ClearSliceMarkups) and "stopped" in out[2].text
    done = ev("slice_done", axis="axial", slice=4, stop_reason="stop", failure=None,
              mask=encode_rle(np.zeros((H, W), bool)), turns=1)
    write = planner.plan(done)
    assert isinstance(write[0], WriteMaskSlice) and write[0].voxels == 0  # an earlier run's mask is removed
    bad = ev("action", axis="axial", slice=1, turn=0, action={"name": "bogus"}, pixels=None)
    assert planner.plan(bad)[-1].level == "warning"


def test_continue_runs_keep_the_slice_and_failures_end_the_run():
    planner = MarkupPlanner(GEOMETRY)
    planner.plan(ev("run_started", run="c1", axis="axial", target="liver", slices=[2], kind="continue"))
    out = planner.plan(point_event(2, 3, 5.0, 5.0, True, run="c1"))
    assert [type(i) for i in out] == [BeginUndoStep, AddPoint] and out[1].label == "s2-t4"
    assert planner.plan(ev("client_error", reason="lost"))[0] == RunFinished("failed", "lost")
    err = planner.plan(ev("error", axis="axial", slice=2, turn=1, reason="tool failed"))[0]
    assert err.level == "warning" and "turn 2" in err.text


def test_markup_descriptions_round_trip():
    text = markup_description("coronal", 7, 2, "r9")
    assert parse_description(text) == {"medsam": 1, "axis": "coronal", "slice": 7, "turn": 2, "run": "r9",
                                       "author": "agent"}
    assert parse_description("") == {} and parse_description('{"x": 1}') == {} and parse_description("F-1") == {}


# ---------------------------------------------------------------------- override state machine
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def agent_items():
    return [PromptItem("roi1", "box", (5.0, 4.0, 30.0, 20.0), True, 0),
            PromptItem("pts+/1", "point", (10.0, 8.0), True, 1)]


def manager():
    clock = Clock()
    m = OverrideManager({"axial": (W, H)}, debounce_s=0.3, clock=clock)
    m.baseline("axial", 2, agent_items())
    return m, clock


def test_edits_are_found_and_recorded_as_the_users():
    m, clock = manager()
    assert m.state("axial", 5) == IDLE
    assert m.update("axial", {2: agent_items()}) == [] and m.state("axial", 2) == SHOWN
    jitter = [agent_items()[0], PromptItem("pts+/1", "point", (10.01, 8.0), True, 1)]
    assert m.update("axial", {2: jitter}) == [] and m.state("axial", 2) == SHOWN  # a click, not a drag
    moved = [agent_items()[0], PromptItem("pts+/1", "point", (12.0, 9.0), True, 1)]
    (edit,) = m.update("axial", {2: moved})
    assert edit["edit"] == "move_point" and edit["author"] == "user" and edit["before"] == [10.0, 8.0]
    assert m.state("axial", 2) == EDITING
    resized = [PromptItem("roi1", "box", (5.0, 4.0, 35.0, 20.0), True, 0), moved[1]]
    assert m.update("axial", {2: resized})[0]["edit"] == "resize_box"
    shifted = [PromptItem("roi1", "box", (6.0, 5.0, 36.0, 21.0), True, 0), moved[1]]
    assert m.update("axial", {2: shifted})[0]["edit"] == "move_box"
    added = shifted + [PromptItem("pts-/7", "point", (20.0, 10.0), False)]
    assert m.update("axial", {2: added})[0]["edit"] == "add_point"
    assert m.update("axial", {2: [shifted[0]] + added[2:]})[0]["edit"] == "delete_point"
    assert [e["edit"] for e in m.trajectory] == ["move_point", "resize_box", "move_box", "add_point", "delete_point"]


def test_a_point_dragged_to_another_slice_is_one_move_and_both_slices_recompute():
    m, clock = manager()
    m.baseline("axial", 3, [])
    items = agent_items()
    (edit,) = m.update("axial", {2: [items[0]], 3: [PromptItem("pts+/1", "point", (10.0, 8.0), True, 1)]})
    assert edit["edit"] == "move_point" and edit["from_slice"] == 2 and edit["slice"] == 3
    clock.t += 1
    requests = {r.slice: r for r in m.due_requests()}
    assert set(requests) == {2, 3}
    assert requests[3].prompts == [{"point": [10.0, 8.0], "positive": True}]


def test_recompute_waits_for_quiet_and_never_loses_an_edit():
    m, clock = manager()
    items = agent_items() + [PromptItem("pts-/9", "point", (20.0, 10.0), False)]
    m.update("axial", {2: items})
    assert m.due_requests() == []  # still within the debounce time
    clock.t += 0.2
    m.update("axial", {2: items[:2] + [PromptItem("pts-/9", "point", (21.0, 11.0), False)]})
    clock.t += 0.2
    assert m.due_requests() == []  # the second edit restarted the wait
    clock.t += 0.2
    (req,) = m.due_requests()
    assert m.state("axial", 2) == RECOMPUTING
    # agent's prompts by turn first, then the annotator's, in the worker's override format
    assert req.payload() == {"axis": "axial", "slice": 2, "prompts": [
        {"box": [5.0, 4.0, 30.0, 20.0]}, {"point": [10.0, 8.0], "positive": True},
        {"point": [21.0, 11.0], "positive": False}]}
    # edited while the worker computes: the answer is shown, then it goes again with the newest prompts
    newest = items[:2] + [PromptItem("pts-/9", "point", (25.0, 12.0), False)]
    m.update("axial", {2: newest})
    assert m.due_requests() == []  # one request per slice at a time
    assert m.finish(req) is True and m.state("axial", 2) == EDITING
    (again,) = m.due_requests()
    assert again.prompts[-1] == {"point": [25.0, 12.0], "positive": False}
    assert m.finish(req) is False  # a stale answer is ignored
    assert m.finish(again) is True and m.state("axial", 2) == SHOWN


def test_a_failed_recompute_keeps_the_edits_and_the_next_edit_retries():
    m, clock = manager()
    items = agent_items()[:1]
    m.update("axial", {2: items})
    clock.t += 1
    (req,) = m.due_requests()
    assert m.finish(req, error="worker gone") is False and m.state("axial", 2) == ERROR
    assert m.editor("axial", 2).items == items and m.editor("axial", 2).error == "worker gone"
    m.recompute_now("axial", 2)
    (retry,) = m.due_requests()
    assert retry.prompts == [{"box": [5.0, 4.0, 30.0, 20.0]}]


def test_prompts_off_the_slice_are_clipped_or_left_out():
    item = PromptItem("b", "box", (-10.0, 5.0, W + 10.0, 12.0))
    assert item.wire(W, H) == {"box": [-0.5, 5.0, W - 0.5, 12.0]}
    assert PromptItem("b", "box", (-20.0, 5.0, -10.0, 12.0)).wire(W, H) is None  # nothing left on the slice
    m, clock = manager()
    m.update("axial", {2: agent_items() + [PromptItem("p", "point", (W + 3.0, 1.0), True)]})
    clock.t += 1
    (req,) = m.due_requests()
    assert req.dropped == ["p"] and len(req.prompts) == 2
    assert m.next_deadline() is None


def test_prompts_are_read_off_markups_positions():
    ras = GEOMETRY.pixel_to_ras("axial", 4, 12.5, 7.25)
    index, item = point_item(GEOMETRY, "axial", "n/1", ras, False)
    assert index == 4 and np.allclose(item.coords, (12.5, 7.25)) and item.author == "user"
    assert point_item(GEOMETRY, "axial", "n/2", GEOMETRY.pixel_to_ras("axial", 9, 1, 1), True) is None
    obj, size = GEOMETRY.box_to_roi("axial", 1, (3.0, 4.0, 20.0, 25.0))
    index, box = box_item(GEOMETRY, "axial", "roi", obj, size, 0)
    assert index == 1 and np.allclose(box.coords, (3.0, 4.0, 20.0, 25.0)) and box.author == "agent"
    grouped = by_slice([(1, PromptItem("u", "point", (1, 1))), (1, PromptItem("b", "box", (0, 0, 2, 2), True, 3)),
                        (1, PromptItem("a", "point", (1, 1), True, 0))], slices=[5])
    assert [i.id for i in grouped[1]] == ["a", "b", "u"] and grouped[5] == []


# ---------------------------------------------------------------------- processing state machine
def test_processing_moves_and_what_the_button_shows():
    sm = P.ProcessingStateMachine()
    seen = []
    sm.listeners.append(lambda old, new, msg: seen.append((old, new)))
    assert sm.button(True) == P.ButtonView("Auto-segment", True, sm.button(True).tooltip, "start")
    assert not sm.button(False, "Choose a volume.").enabled
    for state, text, enabled, action in ((P.INSTALLING, "Installing...", False, None),
                                         (P.LOADING, "Cancel", True, "cancel"),
                                         (P.RUNNING, "Cancel", True, "cancel"),
                                         (P.CANCELLING, "Cancelling...", False, None),
                                         (P.IDLE, "Auto-segment", True, "start")):
        sm.to(state)
        view = sm.button(True)
        assert (view.text, view.enabled, view.action) == (text, enabled, action)
    assert seen[0] == (P.IDLE, P.INSTALLING) and len(seen) == 5
    with pytest.raises(P.InvalidTransition):
        sm.to(P.CANCELLING)  # nothing to cancel
    sm.to(P.RUNNING)
    with pytest.raises(P.InvalidTransition):
        sm.to(P.INSTALLING)
    sm.to(P.ERROR, "worker crashed")
    assert not sm.busy and sm.button(True).action == "start" and sm.message == "worker crashed"
    sm.to(P.LOADING)  # try again
    assert sm.busy
    sm.reset("The scene was closed.")  # whatever the state
    assert sm.state == P.IDLE and seen[-1] == (P.LOADING, P.IDLE) and sm.message == "The scene was closed."
    for state, targets in P.TRANSITIONS.items():
        assert state not in targets and targets <= set(P.STATES)


def test_progress_per_slice():
    clock = Clock()
    p = P.RunProgress(clock)
    p.update(ev("run_started", axis="axial", slices=[4, 5, 6]))
    assert p.text() == "Starting..." and p.fraction() == 0
    p.update(box_event(4, 0))
    assert p.text() == "Slice 1 of 3 (slice 4, turn 1)"
    p.update(ev("slice_done", axis="axial", slice=4))
    p.update(point_event(5, 1, 1, 1, True))
    assert p.text() == "Slice 2 of 3 (slice 5, turn 2)" and p.fraction() == pytest.approx(1 / 3)
    clock.t += 2.5
    p.update(ev("run_done", status="done"))
    assert p.text() == "Done: 1 slice, 2 actions in 2.5 s." and p.fraction() == 1.0
    auto = P.RunProgress(clock)
    auto.update(ev("run_started", axis="axial", slices="auto"))
    auto.update(box_event(9, 0))
    assert auto.fraction() is None and auto.text() == "Auto-grow: 0 slices done (slice 9, turn 1)"
    auto.update(ev("run_done", status="cancelled"))
    assert auto.text().startswith("Cancelled")
    failed = P.RunProgress(clock)
    failed.update(ev("client_error", reason="lost the worker"))
    assert failed.text() == "Failed after 0 slices: lost the worker"


# ---------------------------------------------------------------------- undo
def test_undo_steps_follow_their_slice_when_events_interleave():
    u = UndoStack(limit=3)
    owner = object()
    u.begin("box s1", "axial", 1, owner)
    u.add_markup(("roi", "r1"))
    u.begin("box s2", "axial", 2, owner)
    u.add_markup(("roi", "r2"))
    block = np.ones((1, 2, 2), np.uint8)
    assert u.needs_before("axial", 1, owner)
    u.save_before("axial", 1, (0, 1, 0, 1, 1, 1), block)  # slice 1's mask arrives after slice 2's action
    u.save_before("axial", 1, (0, 1, 0, 1, 1, 1), block * 0)  # only the first "before" counts
    assert not u.needs_before("axial", 1, owner) and not u.needs_before("axial", 5, owner)
    step = u.pop()
    assert step.label == "box s2" and step.masks == {}
    step = u.pop()
    assert step.markups == [("roi", "r1")] and step.masks[("axial", 1)][1].sum() == 4
    for n in range(5):
        u.begin(f"s{n}", "axial", n, owner)
    assert len(u) == 3 and u.label() == "s4"
    u.forget(owner)
    assert len(u) == 0 and u.pop() is None


# ---------------------------------------------------------------------- audit
def test_the_audit_trail_records_who_did_what_and_the_mask_after_it(tmp_path):
    log = AuditLog()
    log.start_run("r1", "liver", "axial", "CT", {"policy": "replay"})
    for e in (box_event(2, 0), box_event(3, 0), mask_event(3, 0, blob(1, 1, 5, 5)), mask_event(2, 0, blob(0, 0, 9, 9)),
              ev("action", axis="axial", slice=2, turn=1, action={"name": "stop_action", "arguments": {}}, pixels=None),
              ev("run_done", status="done"), box_event(9, 0, run="other")):
        log.record_event(e)
    (rec,) = log.runs
    assert rec.status == "done" and rec.finished is not None and len(rec.entries) == 3
    by_slice_turn = {(e.slice, e.turn): e for e in rec.entries}
    assert decode_rle(by_slice_turn[(2, 0)].mask).sum() == 81  # masks land on their own action
    assert decode_rle(by_slice_turn[(3, 0)].mask).sum() == 16
    assert by_slice_turn[(2, 1)].kind == "stop" and by_slice_turn[(2, 1)].mask is None
    edits = [{"edit": "add_point", "author": "user", "slice": 2}]
    log.record_override("r1", "axial", 2, edits, [{"box": [1, 1, 5, 5]}], encode_rle(blob(0, 0, 2, 2)))
    assert [e.author for e in log.entries()] == ["agent", "agent", "agent", "user"]
    assert decode_rle(log.last_mask("axial", 2)).sum() == 4
    back = AuditLog.from_json(log.to_json())
    assert back.to_dict() == log.to_dict() and back.run("r1").settings["policy"] == "replay"
    path = log.export(tmp_path / "out" / "trail.json")
    assert json.loads(path.read_text())["runs"][0]["entries"][3]["edits"] == edits
    assert AuditLog.from_json("").runs == []
    with pytest.raises(ValueError, match="not a MedSAM Agent audit"):
        AuditLog.from_json('{"format": "something"}')
    with pytest.raises(ValueError, match="author"):
        AuditEntry("robot", "action", "axial", 1)


# ---------------------------------------------------------------------- dependencies
def test_requirements_parse_with_lower_bounds_only():
    reqs = deps.parse_requirements("# comment\nnumpy>=1.24\n\nSimpleITK >= 2.3  # reading\nplain\n")
    assert [str(r) for r in reqs] == ["numpy>=1.24", "SimpleITK>=2.3", "plain"]
    assert reqs[1].key == "simpleitk"
    with pytest.raises(ValueError, match="line 1"):
        deps.parse_requirements("numpy==1.0")
    assert deps.satisfies("2.5.1+cu121", "2.5") and deps.satisfies("1.0rc1", "1.0") and deps.satisfies("10.0", "9.9")
    assert not deps.satisfies("1.23.5", "1.24") and deps.release("2.0.0") == (2,)


def test_what_is_missing_is_read_from_the_installed_packages():
    import numpy as installed_numpy

    missing = deps.check(deps.parse_requirements("numpy>=1.0\nnumpy>=999\nno-such-package-medsam>=1\n"
                                                 "opencv-python-headless>=1.0"))
    assert [(m.requirement.name, m.installed) for m in missing] == [("numpy", installed_numpy.__version__),
                                                                    ("no-such-package-medsam", None)]
    assert "not installed" in missing[1].describe() and "installed: " in missing[0].describe()


def test_the_install_plan_puts_torch_first_and_builds_sam2_against_it():
    from MedSAMAgentLib.slicer_support.installer import install_commands

    missing = deps.check(deps.parse_requirements("sam2>=1.1\nnumpy>=999\ntorch>=2.5\ntorchvision>=0.20"),
                         version_of=lambda name: None)
    plan = deps.plan_install(missing)
    assert [s.method for s in plan.steps] == ["torch", "pip", "pip"]
    assert plan.steps[0].requirements == ["torch>=2.5", "torchvision>=0.20"]
    assert plan.steps[2].pip_args == ["--no-build-isolation"] and plan.steps[2].environment == {"SAM2_BUILD_CUDA": "0"}
    assert "light-the-torch" in plan.confirmation_text() and "sam2>=1.1 (not installed)" in plan.confirmation_text()
    assert deps.plan_install(missing[1:2]).steps[0].method == "pip" and deps.plan_install([]).empty
    # the commands, with Slicer's Python: light-the-torch first (as the PyTorch extension does), then pip
    commands = install_commands(plan, "/slicer/bin/PythonSlicer")
    assert [c.argv for c in commands] == [
        ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "light-the-torch>=0.5"],
        ["/slicer/bin/PythonSlicer", "-m", "light_the_torch", "install", "torch>=2.5", "torchvision>=0.20"],
        ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "numpy>=999"],
        ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "--no-build-isolation", "sam2>=1.1"]]
    assert commands[3].environment == {"SAM2_BUILD_CUDA": "0"} and "torch, torchvision" in commands[1].title


def test_an_upgrade_of_a_package_this_process_has_loaded_asks_for_a_restart():
    missing = [deps.Missing(deps.Requirement("numpy", "999"), "1.0"),  # loaded here (the tests import it)
               deps.Missing(deps.Requirement("no-such-package-medsam", "1"), None)]
    assert deps.upgraded_while_loaded(missing) == ["numpy"]
    assert deps.upgraded_while_loaded(missing, modules={"json": None}) == []
    assert deps.upgraded_while_loaded([deps.Missing(deps.Requirement("numpy", "999"), None)]) == []  # new: not loaded


def wait_for(job, seconds=60):
    deadline = time.monotonic() + seconds
    while job.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.running, "the install job did not end"
    return job.snapshot()


def test_an_install_runs_in_the_background_and_a_failure_says_why_and_where_the_log_is(tmp_path):
    from MedSAMAgentLib.slicer_support.installer import InstallCommand, InstallJob

    py = sys.executable
    marker = tmp_path / "third-ran"
    commands = [
        InstallCommand("Installing one", [py, "-c", "import os; print('Collecting one'); print(os.environ['X_STEP'])"],
                       {"X_STEP": "env seen"}),
        # real pip, offline: a package that exists nowhere
        InstallCommand("Installing nosuch", [py, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path),
                                             "no-such-package-medsam>=1"]),
        InstallCommand("Installing three", [py, "-c", f"open({str(marker)!r}, 'w')"]),
    ]
    job = InstallJob(commands, tmp_path / "logs" / "install.log")
    started = time.monotonic()
    job.start()
    assert time.monotonic() - started < 0.5  # start() returns at once: the GUI thread never waits on pip
    snap = wait_for(job)
    assert snap.error and "Installing nosuch failed" in snap.error and "no-such-package-medsam" in snap.error
    assert str(tmp_path / "logs" / "install.log") in snap.error and not snap.cancelled
    assert not marker.exists()  # nothing after a failed step
    log = (tmp_path / "logs" / "install.log").read_text()
    assert "Collecting one" in log and "env seen" in log and "no-such-package-medsam" in log
    ok = InstallJob(commands[:1], tmp_path / "ok.log").start()
    done = wait_for(ok)
    assert done.error is None and done.percent() == 100 and done.text() == "Python packages installed."


def test_cancelling_an_install_stops_the_running_command(tmp_path):
    from MedSAMAgentLib.slicer_support.installer import InstallCommand, InstallJob

    py = sys.executable
    marker = tmp_path / "second-ran"
    job = InstallJob([InstallCommand("Installing slow", [py, "-c", "import time; print('Downloading big', flush=True); "
                                                                   "time.sleep(60)"]),
                      InstallCommand("Installing next", [py, "-c", f"open({str(marker)!r}, 'w')"])],
                     tmp_path / "install.log").start()
    deadline = time.monotonic() + 30
    while job.snapshot().line != "Downloading big" and time.monotonic() < deadline:
        time.sleep(0.05)
    snap = job.snapshot()
    assert snap.running and snap.step == 0 and "Step 1 of 2: Installing slow" in snap.text()
    assert snap.percent() == 0
    job.cancel()
    snap = wait_for(job, 10)
    assert snap.cancelled and snap.error is None and "cancelled" in snap.text() and not marker.exists()


def test_dependency_groups():
    reqs = deps.parse_requirements("numpy>=1\nsam2>=1\nfastapi>=0.1\n")
    assert [r.name for r in deps.needed(reqs, "core")] == ["numpy", "fastapi"]
    full = [str(r) for r in deps.needed(reqs, "models", "4bit")]
    assert "torch>=2.5.1" in full and "torchvision>=0.20.1" in full and "bitsandbytes>=0.45" in full and "sam2>=1" in full
    with pytest.raises(ValueError):
        deps.needed(reqs, "everything")


# ---------------------------------------------------------------------- launch options and models
def test_launch_arguments_for_the_worker(tmp_path):
    replay = tmp_path / "r.json"
    replay.write_text("{}")
    launch = Launch(policy=REPLAY, tool=CLASSICAL, device="cpu", max_turns=3, policy_path=str(replay),
                    allow_dirs=(str(tmp_path),))
    # no --device: neither the replay policy nor the classical tool reads it (the worker would refuse it)
    assert launch.serve_args() == ["--policy", "replay", "--replay", str(replay), "--tool", "classical",
                                   "--max-turns", "3", "--batch-size", "8", "--allow-dir", str(tmp_path)]
    assert launch.dependency_group() == "core" and needed_models(launch) == []
    from MedSAMAgentLib.slicer_support.options import MEDSAM_LITE, bundled_tool, tool_choices

    lite = Launch(policy=REPLAY, tool=MEDSAM_LITE, device="cpu", policy_path=str(replay))
    assert lite.serve_args()[4:8] == ["--tool", "medsam-lite", "--device", "cpu"]  # it reads --device
    assert needed_models(lite) == [] and MEDSAM_LITE in tool_choices() and bundled_tool() == MEDSAM_LITE
    default = Launch(quantization="4bit", device="cuda")
    args = default.serve_args()
    assert args[:6] == ["--policy", "qwen", "--model", "medsam-agent-8b", "--quantization", "4bit"]
    assert args[6:10] == ["--tool", "sam2", "--checkpoint", "medsam2"] and default.dependency_group() == "models"
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    local = Launch(policy=LOCAL, policy_path=str(tmp_path), tool=LOCAL, tool_path=str(ckpt))
    assert local.serve_args()[:8] == ["--policy", "qwen", "--model", str(tmp_path), "--tool", "sam2",
                                      "--checkpoint", str(ckpt)]
    assert needed_models(local) == [] and Launch() == Launch() and hash(Launch()) == hash(Launch())
    for bad, message in ((Launch(policy="nope"), "Unknown policy"), (Launch(quantization="4bit", device="cpu"), "CUDA"),
                         (Launch(max_turns=0), "between"), (Launch(policy=REPLAY), "trajectory file"),
                         (Launch(tool=LOCAL, tool_path=str(tmp_path)), "checkpoint")):
        with pytest.raises(LaunchError, match=message):
            bad.serve_args()
    assert "medsam-agent-8b" in policy_choices() and REPLAY in policy_choices()
    assert {"medsam2", CLASSICAL, LOCAL} <= set(tool_choices())


def test_missing_models_and_the_download_dialog_text(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path))
    launch = Launch()
    assert missing_models(launch) == ["medsam-agent-8b", "medsam2"]
    (tmp_path / "models" / "medsam2").mkdir(parents=True)
    (tmp_path / "models" / "medsam2" / ".complete.json").write_text("{}")
    assert missing_models(launch) == ["medsam-agent-8b"]
    text = download_prompt(["medsam-agent-8b", "medsam2"])
    assert "17.5 GB" in text and "0.16 GB" in text and "Apache-2.0" in text and "Total download: 17.66 GB" in text
    assert str(tmp_path / "models") in text and "Use local files" in text and ".complete.json" in text


# ---------------------------------------------------------------------- downloads (a real HTTP server: conftest's hub)


def test_a_download_reports_progress_and_finishes(hub):
    data = bytes(range(256)) * 12000  # about 3 MB: several chunks
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = data
    job = DownloadJob(["medsam2"]).start()
    job.join(30)
    snap = job.snapshot()
    assert not snap.running and snap.error is None and snap.finished == ["medsam2"]
    assert snap.done == snap.total == len(data) and snap.percent() == 100 and snap.text() == "Download complete."
    assert models.local_path("medsam2").read_bytes() == data


def test_a_cancelled_download_leaves_nothing_half_written_and_an_error_is_reported(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)  # 1 MB chunks: several here
    data = bytes(range(256)) * 12000
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = data
    gate = threading.Event()

    def slow_download(name, progress_factory):  # the real download, paused after its first chunk
        def factory(filename, total):
            bar = progress_factory(filename, total)
            update = bar.update

            def paused(n):
                update(n)
                gate.wait(10)
            bar.update = paused
            return bar
        return models.download(name, factory)

    job = DownloadJob(["medsam2"], download=slow_download).start()
    while job.snapshot().done == 0:
        threading.Event().wait(0.01)
    text = job.snapshot().text()  # what the progress dialog shows: the model's size and licence, the file, MB
    assert text.startswith("Downloading medsam2 (0.16 GB, licence: Apache-2.0)")
    assert "MedSAM2_latest.pt: 1 of 3 MB" in text
    job.cancel()
    gate.set()
    job.join(30)
    snap = job.snapshot()
    assert snap.cancelled and snap.finished == [] and "fetched next time" in snap.text()
    folder = models.model_dir("medsam2")
    assert not models.is_complete("medsam2") and not (folder / "MedSAM2_latest.pt").exists()
    assert not [p for p in folder.rglob("*.incomplete")]  # no half file that could be taken for the weights
    failing = DownloadJob(["sam2.1-tiny"]).start()  # not on this hub: the hub answers 404
    failing.join(30)
    assert not failing.snapshot().running and "HTTP 404" in failing.snapshot().error
    assert failing.snapshot().text() == failing.snapshot().error


# ---------------------------------------------------------------------- replay files
def test_a_replay_file_plays_the_actions_on_the_listed_slices(tmp_path):
    path = write_replay(tmp_path / "replay.json", "axial", [3, 4], target="brain")
    trajectories = load_trajectories(path)
    assert [t.episode_id for t in trajectories] == ["axial:3", "axial:4"]
    policy = ReplayPolicy({t.episode_id: [s.text for s in t.steps] for t in trajectories})
    obs = [Observation(episode_id=eid, target="brain", turn=0) for eid in ("axial:3", "axial:5")]
    first = policy.act(obs)
    assert first[0].action.name == "add_bbox" and first[1].action.name == "stop_action"
    with pytest.raises(ValueError, match="Not an action"):
        write_replay(tmp_path / "bad.json", "axial", [1], actions=[{"name": "fly"}])


def test_an_edit_made_while_a_recompute_failed_is_still_sent():
    m, clock = manager()
    m.update("axial", {2: agent_items()[:1]})
    clock.t += 1
    (req,) = m.due_requests()
    moved = agent_items()[1:2]
    m.update("axial", {2: moved})  # edited again while the first request is out
    assert m.finish(req, error="worker gone") is False
    (again,) = m.due_requests()  # the newer prompts go at once, not left behind the failure
    assert again.items == moved


def test_the_panels_targets_are_split_deduplicated_and_bounded():
    from MedSAMAgentLib.slicer_support.run_choice import MAX_TARGETS, parse_targets

    assert parse_targets("liver, spleen;  left   kidney\nLiver") == ["liver", "spleen", "left kidney"]
    assert parse_targets("aorta") == ["aorta"]
    for empty in ("", " ,; ", None):
        with pytest.raises(ValueError, match="Type a target"):
            parse_targets(empty)
    with pytest.raises(ValueError, match=f"at most {MAX_TARGETS}"):
        parse_targets(",".join(f"organ {n}" for n in range(MAX_TARGETS + 1)))


def test_the_slices_of_each_mode_are_clipped_to_the_volume():
    from MedSAMAgentLib.slicer_support.run_choice import slices_for_mode

    assert slices_for_mode("current slice", 4, 10) == [4]
    assert slices_for_mode("range", 1, 10, before=3, after=2) == [0, 1, 2, 3]
    assert slices_for_mode("range", 8, 10, before=1, after=5) == [7, 8, 9]
    assert slices_for_mode("auto-grow", 5, 10) == "auto"
    with pytest.raises(ValueError, match="outside the volume"):
        slices_for_mode("current slice", 10, 10)
    with pytest.raises(ValueError, match="0 or more"):
        slices_for_mode("range", 3, 10, before=-1)
    with pytest.raises(ValueError, match="Unknown slice mode"):
        slices_for_mode("all", 3, 10)


def test_the_progress_of_a_press_of_several_targets_counts_them_all():
    from MedSAMAgentLib.slicer_support.processing import RunProgress

    p = RunProgress(clock=lambda: 0.0).among_targets("spleen", 1, 3)
    p.update({"type": "run_started", "slices": [4, 5]})
    p.update({"type": "action", "slice": 4, "turn": 0, "pixels": {"box": [1, 2, 3, 4]}})
    p.update({"type": "slice_done", "slice": 4})
    assert p.fraction() == pytest.approx((1 + 0.5) / 3)
    assert p.text() == "spleen (2 of 3): Slice 2 of 2 (slice 4, turn 1)"
    p.update({"type": "run_done", "status": "done"})
    assert p.fraction() == pytest.approx(2 / 3)


def test_the_panels_profile_choice_reaches_the_worker():
    from MedSAMAgentLib.slicer_support.options import POLICY_DEFAULT_PROFILE, Launch, LaunchError

    own = Launch()
    assert own.profile == POLICY_DEFAULT_PROFILE and "--profile" not in own.serve_args()  # the catalogue's default
    rl = Launch(profile="medsam-agent-v1")
    args = rl.serve_args()
    assert args[args.index("--profile") + 1] == "medsam-agent-v1"
    assert not rl.same_worker(own)  # another profile is another worker
    with pytest.raises(LaunchError, match="Profile must be one of"):
        Launch(profile="chatty").check()
