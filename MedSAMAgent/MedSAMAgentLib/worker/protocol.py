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

Limits: an override takes at most :data:`MAX_OVERRIDE_PROMPTS` prompts (422 beyond); at most
:data:`MAX_SESSIONS` sessions are open at once (429 beyond); a closed session's finished runs
are forgotten at once, and at most :data:`MAX_KEPT_RUNS` finished runs are kept in all;
``/v1/status`` shows what is held (``sessions``, ``runs_kept``, ``limits``).  Paths: every file a
request makes the worker read -- the named file, a DICOM series' files, any data file a header
names -- lies inside an ``--allow-dir`` folder (403 otherwise, whether or not it exists); an
upload may name no other file.

Events (each has ``seq``, ``type``, ``run``; slice events also ``axis``, ``slice``):
``run_started`` {slices (planned, or "auto")}, ``action`` {turn, action (grid tool call),
pixels, text, actor}, ``mask`` {turn, mask, score}, ``error`` {turn, reason},
``slice_done`` {stop_reason, failure, mask, turns}, ``run_done`` {status:
done | cancelled | failed, reason?}.
"""
from __future__ import annotations

PROTOCOL_VERSION = 1

# Bounds on the work one request or one client can give the worker (each refusal is a 4xx naming it):
MAX_OVERRIDE_PROMPTS = 200  # prompts in one override: far above the few boxes and clicks a person places
MAX_SESSIONS = 32  # open sessions at once (each holds a volume); a 33rd gets 429 until one closes or expires
MAX_KEPT_RUNS = 256  # finished runs kept for their event streams; the oldest are forgotten first
INLINE_OVERRIDE_PIXELS = 1 << 20  # a CPU tool's override on a slice up to this size runs on the event loop;
# a larger one (an 8000x8000 picture) on a thread, so that /v1/health never waits behind it
TOKEN_ENV = "MEDSAM_AGENT_TOKEN"
EVENT_TYPES = ("run_started", "action", "mask", "error", "slice_done", "run_done")
