"""Which command-line options each policy and tool reads, and one rule for all of them: an option
given to a run whose policy and tool do not read it is refused, never silently ignored.

Used by ``segment``, ``eval`` and ``serve`` (and the Slicer module builds its worker's command
line from the same table, so it never passes an option that would be refused).
"""
from __future__ import annotations

import argparse

# option (argparse dest) -> (policies that read it, tools that read it); a run reads the option when
# its policy is in the first set or its tool in the second
OPTION_READERS: dict[str, tuple[frozenset, frozenset]] = {
    "model": (frozenset({"qwen", "openai"}), frozenset()),
    "policy_url": (frozenset({"openai"}), frozenset()),
    "quantization": (frozenset({"qwen"}), frozenset()),
    "replay": (frozenset({"replay"}), frozenset()),
    "checkpoint": (frozenset(), frozenset({"sam2", "medsam2"})),
    "tool_config": (frozenset(), frozenset({"sam2", "medsam2"})),
    "prompt_mode": (frozenset(), frozenset({"sam2", "medsam2"})),
    "multimask": (frozenset(), frozenset({"sam2", "medsam2"})),
    "tool_precision": (frozenset(), frozenset({"sam2", "medsam2"})),
    "keep_slices": (frozenset(), frozenset({"sam2", "medsam2", "medsam-lite"})),
    "device": (frozenset({"qwen"}), frozenset({"sam2", "medsam2", "medsam-lite"})),
}
# what "not given" looks like for each (argparse defaults)
NOT_GIVEN = {"device": ("auto", None), "multimask": (False, None)}
DEFAULTS_WHEN_READ = {"prompt_mode": "released"}


def option_flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def reads(dest: str, policy: str, tool: str) -> bool:
    """Whether a run with ``policy`` and ``tool`` reads the option ``dest``."""
    policies, tools = OPTION_READERS[dest]
    return policy.strip().lower() in policies or tool.strip().lower() in tools


def check_options_apply(args, error=ValueError) -> None:
    """Raises ``error`` for the first option given that neither the policy nor the tool reads (e.g.
    ``--checkpoint`` with ``--tool classical``), then fills the defaults of the options that apply."""
    policy, tool = getattr(args, "policy", ""), getattr(args, "tool", "")
    for dest in OPTION_READERS:
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value in NOT_GIVEN.get(dest, (None,)):
            continue
        if not reads(dest, policy, tool):
            policies, tools = OPTION_READERS[dest]
            who = " or ".join([f"--policy {p}" for p in sorted(policies)] +
                              [f"--tool {t}" for t in sorted(tools - {'medsam2'})])
            raise error(f"{option_flag(dest)} is read by {who} only, and this run uses --policy {policy} with --tool "
                        f"{tool}; leave {option_flag(dest)} out, or choose a policy or tool that reads it.")
    for dest, default in DEFAULTS_WHEN_READ.items():
        if hasattr(args, dest) and getattr(args, dest) is None and reads(dest, policy, tool):
            setattr(args, dest, default)


def label_values(text: str) -> list[int]:
    """``--label``'s value: one label or several separated by commas ("1,2,3"); argparse type."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a label value or a list of them (e.g. 3, or 1,2,3)") \
                from None
    return values
