"""The worker's wire protocol, version 1.

Every request carries ``Authorization: Bearer <token>`` (the token the worker
was started with); JSON in, JSON out, masks run-length encoded (``{"size":
[h, w], "counts": [...]}``, see :mod:`~MedSAMAgentLib.masks`).  Pixel
coordinates are index coordinates of the *slice image* in display orientation
(see :mod:`~MedSAMAgentLib.volume`); grid coordinates are the policy's 0-999.

=========================================  ===================================================
``GET  /v1/health``                        ``{"ok", "protocol", "version", "state"}``
``GET  /v1/status``                        state (loading/ready/error), device, policy, tool,
                                           memory, queue length, sessions, runs
``POST /v1/sessions``                      ``{"path"}`` of a volume/image inside an allowed folder,
                                           or the file's bytes (``application/octet-stream``,
                                           ``X-Filename`` header) -> session info (geometry, slices)
``DELETE /v1/sessions/{sid}``              close; idle sessions expire on their own
``POST /v1/sessions/{sid}/runs``           ``{"target", "axis", "slices", "key_slice", "batch_size",
                                           "max_turns"}`` -> ``{"run"}``
``GET  /v1/runs/{rid}/events?after=N``     NDJSON stream of the run's events with ``seq > N``,
                                           until ``run_done``; reconnect with the last seq seen
``POST /v1/runs/{rid}/cancel``             stops within one turn
``POST /v1/sessions/{sid}/override``       ``{"axis", "slice", "prompts": [{"box": [x1,y1,x2,y2]} |
                                           {"point": [x, y], "positive": bool}]}`` -> the tool's mask
                                           for exactly that prompt set (decoder only), jumps the queue
``POST /v1/sessions/{sid}/continue``       ``{"axis", "slice", "target", "turns"}`` -> ``{"run"}``: the
                                           agent takes more turns from the slice's current state
``GET  /v1/sessions/{sid}/slices/{axis}/{i}``  the slice's prompts, mask and audit log
``POST /v1/shutdown``                      stop the worker
=========================================  ===================================================

Events (each has ``seq``, ``type``, ``run``; slice events also ``axis``, ``slice``):
``run_started`` {slices (planned, or "auto")}, ``action`` {turn, action (grid tool call),
pixels, text, actor}, ``mask`` {turn, mask, score}, ``error`` {turn, reason},
``slice_done`` {stop_reason, failure, mask, turns}, ``run_done`` {status:
done | cancelled | failed, reason?}.
"""
from __future__ import annotations

PROTOCOL_VERSION = 1
TOKEN_ENV = "MEDSAM_AGENT_TOKEN"
EVENT_TYPES = ("run_started", "action", "mask", "error", "slice_done", "run_done")
