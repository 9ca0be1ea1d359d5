"""The conversation contract a policy is trained and run with, and the one builder of chat messages.

A profile is data (``profiles/<name>.json``): the system prompt with its tool
schemas, the two user-turn texts, the policy image size, the overlay, the grid,
the turn limit and decoding limits.  ``medsam-agent-v1`` is the released
MedSAM-Agent checkpoint's contract, kept byte for byte (see its ``origin``).

:meth:`Profile.build_messages` is the only code that turns an episode into the
messages a policy sees; inference, SFT export and RL rollouts all call it, so
training and inference cannot drift apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .grid import GRID_RULES

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "medsam-agent-v1"


class ProfileError(ValueError):
    """A profile file that is missing or malformed."""


@dataclass(frozen=True)
class Profile:
    name: str
    system_prompt: str
    tools: tuple
    first_user_text: str
    later_user_text: str
    user_content_order: tuple = ("image", "text")
    policy_image_size: tuple = (512, 512)  # (width, height) in pixels
    tool_image_size: int = 1024  # side the tool's encoder works at, pixels
    overlay_color: tuple = (0, 255, 0)  # RGB
    overlay_alpha: float = 0.5
    overlay_threshold: int = 127  # a mask pixel is "on" when its 8-bit value is > threshold
    grid_max: int = 999
    max_turns: int = 5
    max_new_tokens: int = 128
    first_turn_stop_retries: int = 1
    # how the picture, the grid, the parser and retries behave (the authors' RL and evaluation code differ):
    policy_resize: str = "stretch"  # stretch: bilinear to the policy size; letterbox: LANCZOS thumbnail, white pad
    overlay_resize: str = "bilinear"  # the mask to the policy size: bilinear then > threshold, or nearest
    grid_rule: str = "centre"  # centre: v*(size-1)/999 (grid.py); scaled: round(v/999*size), the eval scripts'
    parser: str = "strict"  # strict (actions.parse_action) or reference (actions.parse_reference)
    invalid_reply_retries: int = 0  # an invalid reply asked again this many times per turn (0: the episode ends)
    retry_context: str = "same"  # same: asked again as before; with_reply: the refused reply stays in the context
    tool_defaults: dict = field(default_factory=dict, compare=False)  # e.g. {"multimask": true, "precision": ...}
    sources: dict = field(default_factory=dict, compare=False)  # field -> where in the authors' code it comes from
    origin: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_PROFILE) -> "Profile":
        """Load a bundled profile by name (``medsam-agent-v1``) or a profile JSON file by path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.json")))
            raise ProfileError(f"No profile '{name_or_path}'. Known profiles: {known}; or give a path to a profile JSON file.")
        from .errors import InputError
        from .json_files import read_json_file

        try:
            data = read_json_file(path, "the profile file")
        except InputError as exc:
            raise ProfileError(str(exc)) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        if not isinstance(data, dict) or not isinstance(data.get("overlay", {}), dict):
            raise ProfileError("A profile is a JSON object (its \"overlay\" one too); see the profiles in "
                               f"{PROFILE_DIR} for the shape.")
        if not all(isinstance(data.get(k, ""), str) for k in ("name", "system_prompt", "first_user_text",
                                                                "later_user_text")):
            raise ProfileError("A profile's name, system_prompt, first_user_text and later_user_text are texts.")
        if not isinstance(data.get("tools", []), list) or not all(isinstance(t, dict) for t in data.get("tools", [])):
            raise ProfileError("A profile's tools are a list of tool schemas (JSON objects).")
        overlay = data.get("overlay", {})
        _missing = object()

        def field(where: dict, key: str, convert, default=_missing, shown: str | None = None):
            """``where[key]`` converted, or ProfileError naming the field and what it should be."""
            value = where.get(key, default)
            if value is _missing:
                raise ProfileError(f"The profile has no {shown or key}; see the profiles in {PROFILE_DIR}.")
            try:
                return convert(value)
            except (TypeError, ValueError):
                raise ProfileError(f"The profile's {shown or key} is {json.dumps(value)[:60]}, not "
                                   f"{convert.__doc__ or 'what it should be'}.") from None

        def number(v):
            """a number"""
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise TypeError
            return v

        def whole(v):
            """a whole number"""
            return int(number(v))

        def real(v):
            """a number"""
            return float(number(v))

        def pair(v):
            """two whole numbers [width, height]"""
            values = tuple(whole(x) for x in v)
            if len(values) != 2:
                raise ValueError
            return values

        def rgb(v):
            """three whole numbers [r, g, b]"""
            values = tuple(whole(x) for x in v)
            if len(values) != 3:
                raise ValueError
            return values

        def one_of(*choices):
            def check(v):
                if v not in choices:
                    raise ValueError
                return v
            check.__doc__ = " or ".join(json.dumps(c) for c in choices)
            return check

        def mapping(v):
            """a JSON object"""
            if not isinstance(v, dict):
                raise TypeError
            return dict(v)

        def names(v):
            """a list of texts"""
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise TypeError
            return tuple(v)

        profile = cls(
            name=field(data, "name", str),
            system_prompt=field(data, "system_prompt", str),
            tools=tuple(data.get("tools", ())),
            first_user_text=field(data, "first_user_text", str),
            later_user_text=field(data, "later_user_text", str),
            user_content_order=field(data, "user_content_order", names, ("image", "text")),
            policy_image_size=field(data, "policy_image_size", pair, (512, 512)),
            tool_image_size=field(data, "tool_image_size", whole, 1024),
            overlay_color=field(overlay, "color_rgb", rgb, (0, 255, 0), "overlay.color_rgb"),
            overlay_alpha=field(overlay, "alpha", real, 0.5, "overlay.alpha"),
            overlay_threshold=field(overlay, "threshold", whole, 127, "overlay.threshold"),
            grid_max=field(data, "grid_max", whole, 999),
            max_turns=field(data, "max_turns", whole, 5),
            max_new_tokens=field(data, "max_new_tokens", whole, 128),
            first_turn_stop_retries=field(data, "first_turn_stop_retries", whole, 1),
            policy_resize=field(data, "policy_resize", one_of("stretch", "letterbox"), "stretch"),
            overlay_resize=field(overlay, "resize", one_of("bilinear", "nearest"), "bilinear", "overlay.resize"),
            grid_rule=field(data, "grid_rule", one_of(*GRID_RULES), "centre"),
            parser=field(data, "parser", one_of("strict", "reference"), "strict"),
            invalid_reply_retries=field(data, "invalid_reply_retries", whole, 0),
            retry_context=field(data, "retry_context", one_of("same", "with_reply"), "same"),
            tool_defaults=field(data, "tool_defaults", mapping, {}),
            sources=field(data, "sources", mapping, {}),
            origin=data.get("origin") or "",
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )
        for name, value in (("max_turns", profile.max_turns), ("max_new_tokens", profile.max_new_tokens)):
            if value < 1:
                raise ProfileError(f"Profile {profile.name!r} sets {name} = {value}; it must be at least 1.")
        if min(profile.first_turn_stop_retries, profile.invalid_reply_retries) < 0 \
                or not 0.0 <= profile.overlay_alpha <= 1.0:
            raise ProfileError(f"Profile {profile.name!r}: first_turn_stop_retries and invalid_reply_retries must be "
                               f"0 or more and overlay.alpha between 0 and 1.")
        if profile.policy_resize == "letterbox" and profile.policy_image_size[0] != profile.policy_image_size[1]:
            raise ProfileError(f"Profile {data.get('name')!r}: a letterbox needs a square policy_image_size.")
        if profile.overlay_threshold not in (127, 128):  # on where > 127 (RL code) or > 128 (evaluation code)
            raise ProfileError(f"Profile {data.get('name')!r} sets overlay.threshold = {profile.overlay_threshold}; "
                               f"this engine works with 127 or 128.")
        precision = profile.tool_defaults.get("precision", "bf16")
        if precision not in ("bf16", "float32") or not isinstance(profile.tool_defaults.get("multimask", False), bool):
            raise ProfileError(f"Profile {data.get('name')!r}: tool_defaults.precision is \"bf16\" or \"float32\" "
                               f"and tool_defaults.multimask true or false.")
        for name, value, fixed in (("grid_max", profile.grid_max, 999), ("tool_image_size", profile.tool_image_size, 1024)):
            if value != fixed:  # built into the engine (grid.py, observation.py, the SAM2 tool): not settable
                raise ProfileError(f"Profile {data.get('name')!r} sets {name} = {value}; this engine works with "
                                   f"{name} = {fixed} only.")
        return profile

    def to_dict(self) -> dict:
        return {
            "name": self.name, "origin": self.origin, "system_prompt": self.system_prompt,
            "tools": list(self.tools), "first_user_text": self.first_user_text,
            "later_user_text": self.later_user_text, "user_content_order": list(self.user_content_order),
            "policy_image_size": list(self.policy_image_size), "tool_image_size": self.tool_image_size,
            "overlay": {"color_rgb": list(self.overlay_color), "alpha": self.overlay_alpha,
                        "threshold": self.overlay_threshold, "resize": self.overlay_resize},
            "grid_max": self.grid_max, "max_turns": self.max_turns, "max_new_tokens": self.max_new_tokens,
            "first_turn_stop_retries": self.first_turn_stop_retries, "policy_resize": self.policy_resize,
            "grid_rule": self.grid_rule, "parser": self.parser, "invalid_reply_retries": self.invalid_reply_retries,
            "retry_context": self.retry_context, "tool_defaults": dict(self.tool_defaults),
            "sources": dict(self.sources), **self.extra,
        }

    # ------------------------------------------------------------------ messages
    def parse(self, text: str):
        """A model's reply -> (action or ParseFailure, what was repaired or None), by the profile's parser."""
        from .actions import parse_action, parse_reference

        return parse_reference(text) if self.parser == "reference" else (parse_action(text), None)

    def to_pixels(self, action, width: int, height: int):
        """A grid action -> the tool's pixel prompt for a ``width`` x ``height`` image, by the profile's grid rule."""
        from .actions import to_pixels

        return to_pixels(action, width, height, self.grid_rule)

    def user_text(self, turn: int, target: str) -> str:
        """Text of user turn ``turn`` (0 = first, with the target named)."""
        return self.first_user_text.format(target=target) if turn == 0 else self.later_user_text

    def build_messages(self, target: str, images: Sequence[Any], replies: Sequence[str] = ()) -> list[dict]:
        """One episode as chat messages (transformers / TRL conversational format).

        ``images[t]`` is what the policy sees before its action ``t`` (the plain
        image, then the overlay after each action), at ``policy_image_size``;
        ``replies[t]`` is the assistant text of action ``t``.  With
        ``len(images) == len(replies) + 1`` the conversation ends on a user turn,
        ready for the next action; with equal lengths it ends on the last reply
        (a whole trajectory, as training sees it).  Image items carry the image
        object under ``"image"``.
        """
        if len(images) not in (len(replies), len(replies) + 1):
            raise ValueError(f"{len(images)} images do not fit {len(replies)} replies (need equal or one more)")
        messages: list[dict] = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
        for turn, image in enumerate(images):
            parts = {"image": {"type": "image", "image": image},
                     "text": {"type": "text", "text": self.user_text(turn, target)}}
            messages.append({"role": "user", "content": [parts[k] for k in self.user_content_order]})
            if turn < len(replies):
                messages.append({"role": "assistant", "content": [{"type": "text", "text": replies[turn]}]})
        return messages


_KNOWN_KEYS = {
    "name", "origin", "system_prompt", "tools", "first_user_text", "later_user_text", "user_content_order",
    "policy_image_size", "tool_image_size", "overlay", "grid_max", "max_turns", "max_new_tokens",
    "first_turn_stop_retries", "policy_resize", "grid_rule", "parser", "invalid_reply_retries", "retry_context",
    "tool_defaults", "sources",
}
