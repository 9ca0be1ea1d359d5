"""What one Auto-segment press asks for, from the panel's words: the targets and the slices.

Pure functions (no Slicer): the Logic calls them, and the Slicer-free tests check them.
"""
from __future__ import annotations

SLICE_MODES = ("current slice", "range", "auto-grow")
VIEWS = ("Red", "Green", "Yellow")
MAX_TARGETS = 20  # one Auto-segment press; more is almost certainly a pasted paragraph


def parse_targets(text: str) -> list[str]:
    """The targets typed in the panel: "liver, spleen; left kidney" -> ["liver", "spleen", "left kidney"].

    Separated by commas, semicolons or new lines; blanks dropped; a target typed twice (in any case) is
    kept once, in its first spelling.  ValueError, in the person's words, when nothing is left or too much."""
    seen, targets = set(), []
    for part in str(text or "").replace(";", ",").replace("\n", ",").split(","):
        name = " ".join(part.split())
        if name and name.casefold() not in seen:
            seen.add(name.casefold())
            targets.append(name)
    if not targets:
        raise ValueError("Type a target (what to segment), or several separated by commas.")
    if len(targets) > MAX_TARGETS:
        raise ValueError(f"{len(targets)} targets in one run; at most {MAX_TARGETS}. Split them over several runs.")
    return targets


def slices_for_mode(mode: str, current: int, num_slices: int, before: int = 5, after: int = 5):
    """The slices of a run: ``[current]``, the range ``current - before .. current + after`` clipped to the
    volume (0 .. num_slices - 1), or "auto" (grow from ``current`` while the target is found)."""
    if not 0 <= current < num_slices:
        raise ValueError(f"The view shows slice {current}, outside the volume (0..{num_slices - 1}); "
                         f"move the view onto the volume.")
    if mode == "current slice":
        return [current]
    if mode == "range":
        if before < 0 or after < 0:
            raise ValueError("The range's slices before and after must be 0 or more.")
        return list(range(max(0, current - before), min(num_slices, current + after + 1)))
    if mode == "auto-grow":
        return "auto"
    raise ValueError(f"Unknown slice mode '{mode}'; one of {', '.join(SLICE_MODES)}.")
