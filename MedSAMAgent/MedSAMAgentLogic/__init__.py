"""The Slicer module's own code that needs Slicer's MRML (never imported by the engine,
``MedSAMAgentLib``): pieces of the Logic, tested on the ``slicer-core`` wheels."""
