"""Slicer-free support code for the 3D Slicer module (``MedSAMAgent.py``).

Everything the module decides -- geometry between Slicer's IJK/RAS frames and the
worker's slice images, what to draw for each worker event, the override and
processing state machines, dependency checks, the audit trail, the worker's
life cycle -- lives here as plain Python over numpy, tested with pytest.  The
module file only turns these decisions into MRML nodes and Qt widgets.

Nothing in this package imports ``slicer``, ``vtk``, ``qt`` or ``ctk``.
"""
