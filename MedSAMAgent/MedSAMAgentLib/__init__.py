"""MedSAM Agent engine: a multi-turn segmentation agent (policy + promptable tool).

Importable anywhere (no ``slicer`` import); the 3D Slicer module, the command
line, the worker service and training all use it.
"""
__version__ = "0.1.0"
