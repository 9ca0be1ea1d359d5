"""The agent worker: a long-lived HTTP service (FastAPI + uvicorn) that keeps the models loaded,
and the Slicer-free Python client the 3D Slicer module uses to drive it.

See :mod:`.protocol` for the wire protocol (also served as OpenAPI at ``/openapi.json``).
"""
