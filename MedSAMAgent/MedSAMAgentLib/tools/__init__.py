"""Segmentation tools behind one protocol; ``create_tool`` builds one by name."""
from __future__ import annotations

from .base import NotPrepared, PreparedCache, SegmentationTool, ToolError, ToolResult, image_key

TOOL_NAMES = ("sam2", "medsam-lite", "classical")


def create_tool(name: str, **options) -> SegmentationTool:
    """Build a tool by name: ``sam2`` (options of :class:`Sam2Tool`), ``medsam-lite`` (LiteMedSAM with
    the weights its package ships: :class:`MedSAMLiteTool`) or ``classical``."""
    key = name.strip().lower()
    if key == "classical":
        from .classical import ClassicalTool
        return ClassicalTool(**options)
    if key in ("medsam-lite", "medsam_lite", "litemedsam"):
        from .medsam_lite import MedSAMLiteTool
        return MedSAMLiteTool(**options)
    if key in ("sam2", "medsam2"):
        from .sam2_tool import Sam2Tool
        return Sam2Tool(**options)
    raise ToolError(f"Unknown tool '{name}'. Choose one of: {', '.join(TOOL_NAMES)}.")


__all__ = ["create_tool", "SegmentationTool", "ToolResult", "ToolError", "NotPrepared", "PreparedCache", "image_key", "TOOL_NAMES"]
