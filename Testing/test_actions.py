import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSAMAgentLib.actions import (Box, ParseFailure, PixelBox, PixelPoint, Point, Stop, action_from_dict,
                                    action_to_call, box_from_pixels, format_action, parse_action,
                                    point_from_pixels, to_pixels)
from MedSAMAgentLib.grid import grid_to_pixel, pixel_to_grid


def call(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


@pytest.mark.parametrize("text, expected", [
    (call("add_bbox", {"bbox_2d": [10, 20, 300, 400]}), Box(10, 20, 300, 400)),
    ("  \n" + call("add_bbox", {"bbox_2d": [300, 400, 10, 20]}) + "\n\n", Box(10, 20, 300, 400)),
    ("I will add a box.\n" + call("add_point", {"point_2d": [5, 999], "point_type": "negative"}) + " done",
     Point(5, 999, False)),
    ("```json\n" + call("add_point", {"point_2d": [5.4, 6.6], "point_type": " Positive "}) + "\n```", Point(5, 7, True)),
    (call("stop_action", {}), Stop()),
    ('<tool_call>\n{"name": "stop_action"}\n</tool_call>', Stop()),
    ('```json\n{"name": "add_bbox", "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n```', Box(1, 2, 3, 4)),
    ('<tool_call>{"name": "add_bbox", "arguments": "{\\"bbox_2d\\": [1, 2, 3, 4]}"}</tool_call>', Box(1, 2, 3, 4)),
    ('<tool_call>\n{"name": "add_bbox", "arguments": {"bbox_2d": [1, 2, 3, 4]}}', Box(1, 2, 3, 4)),  # cut off
    (call("add_point", {"point_2d": [1, 2], "point_type": "positive", "note": "x"}), Point(1, 2, True)),
])
def test_parses_valid_calls(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize("text, reason", [
    (call("add_box", {"bbox_2d": [1, 2, 3, 4]}), "unknown tool"),
    (call("add_bbox", {"bbox_2d": [1, 2, 3]}), "list of 4"),
    (call("add_point", {"point_2d": [1, 2, 3], "point_type": "positive"}), "list of 2"),
    (call("add_bbox", {"bbox_2d": [1, "2", 3, 4]}), "must be a number"),
    (call("add_bbox", {"bbox_2d": [1, True, 3, 4]}), "must be a number"),
    (call("add_bbox", {"bbox_2d": [1, 2, 3, 1000]}), "outside 0..999"),
    (call("add_point", {"point_2d": [-1, 2], "point_type": "positive"}), "outside 0..999"),
    ('<tool_call>{"name": "add_bbox", "arguments": {"bbox_2d": [1, NaN, 3, 4]}}</tool_call>', "finite"),
    (call("add_bbox", {"bbox_2d": [5, 2, 5, 4]}), "no area"),
    (call("add_point", {"point_2d": [1, 2], "point_type": "maybe"}), "point_type"),
    (call("add_point", {"point_2d": [1, 2]}), "point_type"),
    (call("add_bbox", {}), "missing argument"),
    (call("stop_action", {}) + call("stop_action", {}), "several tool calls"),
    ('{"name": "stop_action"} {"name": "stop_action"}', "several tool calls"),
    ("<tool_call>not json</tool_call>", "no valid JSON"),
    ("no call here", "no tool call"),
    ("", "no tool call"),
    ('<tool_call>{"arguments": {}}</tool_call>', "no 'name'"),
    ('<tool_call>{"name": 3}</tool_call>', "must be a string"),
    ('<tool_call>{"name": "add_bbox", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
])
def test_rejects_invalid_calls_with_a_reason(text, reason):
    result = parse_action(text)
    assert isinstance(result, ParseFailure)
    assert reason in result.reason


def test_non_text_is_a_failure_not_an_exception():
    assert isinstance(parse_action(None), ParseFailure)
    assert isinstance(parse_action(b"<tool_call>"), ParseFailure)
    assert isinstance(parse_action("{" * 5000 + "}" * 5000), ParseFailure)


TOOL_FRAGMENTS = st.sampled_from([
    "<tool_call>", "</tool_call>", "\n", "```", "```json", '{"name": ', '"add_bbox"', '"add_point"', '"stop_action"',
    '"arguments": ', '{"bbox_2d": [', '{"point_2d": [', '"point_type": "negative"', "]", "}", ", ", "1", "999",
    "-3", "1e9", "NaN", "Infinity", "null", "true", '"', "{", "[", ":",
])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(TOOL_FRAGMENTS, max_size=40).map("".join)))
def test_parser_never_raises(text):
    result = parse_action(text)
    assert isinstance(result, (Box, Point, Stop, ParseFailure))
    if not isinstance(result, ParseFailure):  # anything accepted formats back into something that parses the same
        assert parse_action(format_action(result)) == result


grid = st.integers(0, 999)


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.builds(lambda a, b, c, d: Box(min(a, c), min(b, d), max(a, c), max(b, d)), grid, grid, grid, grid)
    .filter(lambda b: b.x1 < b.x2 and b.y1 < b.y2),
    st.builds(Point, grid, grid, st.booleans()), st.just(Stop())))
def test_format_then_parse_is_identity(action):
    text = format_action(action)
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    assert parse_action(text) == action
    assert action_from_dict(action_to_call(action)) == action


def test_format_matches_the_wire_format_exactly():
    assert format_action(Box(1, 2, 3, 4)) == (
        '<tool_call>\n{"name": "add_bbox", "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n</tool_call>')
    assert format_action(Point(7, 8, False)) == (
        '<tool_call>\n{"name": "add_point", "arguments": {"point_2d": [7, 8], "point_type": "negative"}}\n</tool_call>')
    assert format_action(Stop()) == '<tool_call>\n{"name": "stop_action", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("size", [2, 100, 155, 512, 999, 1000, 2048])
def test_grid_pixel_rule(size):
    assert grid_to_pixel(0, size) == 0.0 and grid_to_pixel(999, size) == size - 1
    for g in range(0, 1000, 37):
        p = grid_to_pixel(g, size)
        assert 0 <= p <= size - 1
        if size - 1 >= 999:  # the grid is the coarser one: grid -> pixel -> grid is exact
            assert pixel_to_grid(p, size) == g
    for px in range(0, size, max(1, size // 50)):
        back = grid_to_pixel(pixel_to_grid(px, size), size)
        assert abs(back - px) <= 0.5 * max(1.0, (size - 1) / 999) + 1e-9


def test_pixels_conversions_use_the_rule():
    box = Box(0, 0, 999, 499)
    assert to_pixels(box, 512, 256) == PixelBox(0.0, 0.0, 511.0, 499 * 255 / 999)
    assert to_pixels(Point(999, 0, True), 300, 200) == PixelPoint(299.0, 0.0, True)
    assert to_pixels(Stop(), 10, 10) is None
    assert box_from_pixels(10, 10, 10, 40, 512, 512).x2 > box_from_pixels(10, 10, 10, 40, 512, 512).x1
    assert point_from_pixels(511, 511, False, 512, 512) == Point(999, 999, False)
