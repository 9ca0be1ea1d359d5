"""The Slicer module's Logic and the code of it that needs Slicer's MRML (never imported by the engine,
``MedSAMAgentLib``): :mod:`.logic` (the Logic: runs, overrides, undo, audit, the timer), its parts
:mod:`.contexts` (per target), :mod:`.markups` (points and boxes), :mod:`.setup_jobs` (packages and models),
:mod:`.host` (what it needs from the application), :mod:`.segment_voxels` (segment writes),
:mod:`.worklist_review` (a label run reviewed case by case), :mod:`.self_test`.  Tested on the ``slicer-core`` wheels."""
