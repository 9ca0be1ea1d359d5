"""The ``medsam-agent`` command line.

Every user mistake (a missing file, an unknown name, a bad option) ends with
one line on stderr saying what is wrong and what to do, and exit status 2 --
never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def _cmd_profile(args) -> int:
    from .profile import Profile, ProfileError

    try:
        profile = Profile.load(args.name)
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(profile.to_dict(), indent=1, ensure_ascii=False))
        return 0
    w, h = profile.policy_image_size
    print(f"profile      {profile.name}")
    print(f"origin       {profile.origin}")
    print(f"policy image {w}x{h} (bilinear, aspect not kept); tool image {profile.tool_image_size}")
    print(f"overlay      RGB {tuple(profile.overlay_color)} alpha {profile.overlay_alpha}")
    print(f"grid         0..{profile.grid_max}; at most {profile.max_turns} turns; "
          f"{profile.max_new_tokens} new tokens per turn, greedy")
    print(f"tools        {', '.join(t['function']['name'] for t in profile.tools)}")
    if args.system_prompt:
        print("\n" + profile.system_prompt)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsam-agent",
        description="MedSAM Agent: a language-model policy drives a promptable segmentation tool, turn by turn.")
    parser.add_argument("--version", action="version", version=f"medsam-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("profile", help="show a conversation profile (the contract a policy runs under)")
    p.add_argument("name", nargs="?", default="medsam-agent-v1", help="profile name or JSON file")
    p.add_argument("--json", action="store_true", help="print the whole profile as JSON")
    p.add_argument("--system-prompt", action="store_true", help="also print the system prompt")
    p.set_defaults(func=_cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"medsam-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
