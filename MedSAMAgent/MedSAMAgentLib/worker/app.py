"""The HTTP face of the worker: FastAPI routes over :class:`~.service.Worker`, and a uvicorn runner.

Safety: every route needs the bearer token (compared in constant time); request
bodies over the limits are refused with 413 before they are read whole; paths
are opened only inside the allowed folders; clients send JSON or a raw image
file, never pickles.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from .. import __version__
from ..file_access import FileGate, parse_user_path
from ..image_io import IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, InputError, load_image, load_mask
from .protocol import MAX_OVERRIDE_PROMPTS
from .service import Worker, WorkerError


class OpenByPath(BaseModel):
    path: str = Field(description="a volume, DICOM folder or image readable by the worker, inside an allowed folder")
    series: str | None = None
    reference: str | None = Field(default=None, description="a reference mask (same geometry), for oracle policies")
    labels: list[int] | None = None


class RunRequest(BaseModel):
    target: str
    axis: str = "axial"
    slices: str | list[int] = "all"
    key_slice: int | None = None
    batch_size: int | None = Field(default=None, ge=1, le=256)
    max_turns: int | None = Field(default=None, ge=1, le=20)


class OverrideRequest(BaseModel):
    axis: str = "axial"
    slice: int = 0
    prompts: list[dict] = Field(default_factory=list, max_length=MAX_OVERRIDE_PROMPTS,
                                description=f"at most {MAX_OVERRIDE_PROMPTS} boxes and points")


class ContinueRequest(BaseModel):
    axis: str = "axial"
    slice: int = 0
    target: str | None = None
    turns: int = Field(default=2, ge=1, le=10)


class RequestGuard:
    """ASGI middleware in front of every route: a request without the worker's bearer token gets
    401, one whose declared body is over the limit gets 413, both before routing or reading it;
    a body that turns out longer than the limit while it is read (no length declared: chunked
    transfer) is refused with 413 at the first chunk past the limit.

    Plain ASGI rather than ``@app.middleware("http")``: that style runs every request (and every
    streamed event) through extra tasks and queues on the event loop, which a busy worker feels.
    It also stamps each request's arrival (``scope["state"]["arrived"]``, perf_counter seconds)."""

    def __init__(self, app, token: str, upload_bytes: int, json_bytes: int):
        self.app, self.token = app, token.encode()
        self.upload_bytes, self.json_bytes = upload_bytes, json_bytes

    def authorized(self, headers: list) -> bool:
        """Exactly one ``Authorization: Bearer <token>`` with the worker's token, compared in constant time."""
        given = bearer_token(headers)
        return given is not None and secrets.compare_digest(given, self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrived"] = time.perf_counter()  # see the override's worker_seconds
            if not self.authorized(scope["headers"]):
                reply = JSONResponse({"detail": "Missing or wrong token: send the header 'Authorization: Bearer "
                                                "<token>' with the token the worker printed at start."},
                                     status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await reply(scope, receive, send)
            headers = dict(scope["headers"])
            upload = scope["path"] == "/v1/sessions" and not headers.get(b"content-type", b"").startswith(
                b"application/json")  # a file's bytes; JSON (open by path) has the JSON limit
            limit = self.upload_bytes if upload else self.json_bytes
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                reply = JSONResponse({"detail": f"Request body of {int(length)} bytes is over the limit of {limit}."},
                                     status_code=413)
                return await reply(scope, receive, send)
            if not length.isdigit():  # no declared length: count what arrives
                receive = _limited(receive, limit)
        return await self.app(scope, receive, send)


def bearer_token(headers: list) -> bytes | None:
    """The token of the one ``Authorization: Bearer <token>`` header among ``headers`` (ASGI's
    (name, value) pairs), or None: no such header, several, another scheme, a bare token, or
    anything around the token (the scheme's name is case-insensitive, as HTTP says)."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, sep, token = values[0].partition(b" ")
    if not sep or scheme.lower() != b"bearer" or not token or any(c in token for c in b" \t\r\n,"):
        return None
    return token


def _limited(receive, limit: int):
    """``receive`` that raises 413 (an HTTPException, which FastAPI passes through as it is) once
    the body has grown past ``limit`` bytes."""
    received = 0

    async def counted():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"Request body over the limit of {limit} bytes.")
        return message

    return counted


async def _stream_or_gone(request: Request):
    """The request body's chunks; a client that goes away midway ends the request quietly (there is
    nobody to answer, and nothing of the worker is wrong)."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise WorkerError("The client went away before its upload was complete.", 400) from None


def describe_problems(errors: list[dict]) -> str:
    """A validator's error records (pydantic's ``errors()``) as one clause each, joined by "; "."""
    problems = []
    for e in errors:
        if e.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
        else:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "the body"
            problems.append(f"{where}: {e['msg']}")
    return "; ".join(problems)


def bearer_openapi(app: FastAPI) -> Callable[[], dict]:
    """The app's OpenAPI document, saying that every route needs the bearer token."""

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in schemas:  # what invalid_request answers: one sentence
                schemas["HTTPValidationError"] = {
                    "title": "HTTPValidationError", "type": "object", "required": ["detail"],
                    "properties": {"detail": {"title": "Detail", "type": "string",
                                              "description": "what is wrong with the request, field by field"}}}
                schemas.pop("ValidationError", None)
            doc.setdefault("components", {})["securitySchemes"] = {
                "token": {"type": "http", "scheme": "bearer",
                          "description": "the token the worker printed (or was given) at start"}}
            doc["security"] = [{"token": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    return schema


def create_app(worker: Worker) -> FastAPI:
    config = worker.config

    app = FastAPI(title="MedSAM Agent worker", version=__version__, docs_url=None, redoc_url=None)
    app.openapi = bearer_openapi(app)
    app.add_middleware(RequestGuard, token=config.token, upload_bytes=config.max_upload_bytes,
                       json_bytes=config.max_json_bytes)

    @app.exception_handler(WorkerError)
    async def worker_error(request: Request, exc: WorkerError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        """One sentence a person can act on, instead of the validator's list of records."""
        return JSONResponse({"detail": f"Wrong request to {request.url.path}: {describe_problems(exc.errors())}."},
                            status_code=422)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status", 400))

    @app.get("/v1/health")
    def health():
        return worker.health()

    @app.get("/v1/status")
    def status():
        return worker.status()

    @app.post("/v1/sessions")
    async def open_session(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/json":
            try:
                body = OpenByPath.model_validate_json(await request.body())
            except ValidationError as exc:
                raise WorkerError(f"Open a session with JSON {{\"path\": ...}}: {describe_problems(exc.errors())}.") from None
            if not body.path.strip():
                raise WorkerError("path is empty; give the path of a volume, DICOM folder or image.")
            gate = worker.gate  # every file read must be inside the allowed folders: a DICOM series' files, a header's data file
            path = gate.check(parse_user_path(body.path))
            loaded = await asyncio.to_thread(load_image, path, body.series, gate)
            reference = None
            if body.reference:
                reference = await asyncio.to_thread(load_mask, body.reference, body.labels, loaded, gate,
                                                    one_target=True)
            return await asyncio.to_thread(worker.open_session, loaded, path.name, reference)
        if not request.headers.get("x-filename", "").strip():
            raise WorkerError("Say the uploaded file's name in the X-Filename header: its ending (.nrrd, .nii.gz, "
                              ".mha, .png ...) tells the worker how to read it.")
        name = Path(request.headers["x-filename"]).name
        suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix.lower()
        if suffix not in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES or suffix in (".mhd", ".nhdr"):
            raise WorkerError(f"Cannot open an uploaded '{suffix}' file; upload NRRD, NIfTI, MHA or a 2D image.")
        received = 0
        with tempfile.TemporaryDirectory(prefix="medsam-upload-") as tmp:
            target = Path(tmp) / f"upload{suffix}"
            with open(target, "wb") as fh:
                async for chunk in _stream_or_gone(request):
                    received += len(chunk)
                    if received > config.max_upload_bytes:
                        raise WorkerError(f"Upload over the limit of {config.max_upload_bytes} bytes.", 413)
                    fh.write(chunk)
            try:  # the upload alone may be read: a header in it may name no other file
                loaded = await asyncio.to_thread(load_image, target, None, FileGate(only=target, shown_as=name))
            except InputError as exc:  # said of the client's file, not of the worker's temporary copy
                raise type(exc)(str(exc).replace(str(target), name).replace(target.name, name)) from None
        return await asyncio.to_thread(worker.open_session, loaded, name)

    @app.delete("/v1/sessions/{sid}")
    def close_session(sid: str):
        worker.close_session(sid)
        return {"closed": sid}

    @app.post("/v1/sessions/{sid}/runs")
    def start_run(sid: str, body: RunRequest):
        run = worker.start_run(sid, body.target, body.axis, body.slices, body.key_slice, body.batch_size,
                               body.max_turns)
        return {"run": run.id}

    @app.get("/v1/runs/{rid}/events")
    async def events(rid: str, request: Request, after: int = -1):
        run = worker.run(rid)
        if after < -1:
            raise WorkerError("after must be -1 (from the start) or the number of an event already received.")

        async def stream():
            seen = after
            while True:
                lines = await run.next_lines(seen, 1.0)
                if lines:  # all that is new in one write (each event's JSON was written when it happened)
                    seen += len(lines)
                    yield "".join(lines)
                    if run.done_seq is not None and seen >= run.done_seq:
                        return
                    continue
                if run.status != "running":  # reopened after the end: say so again, so every stream ends alike
                    yield run.lines[run.done_seq]
                    return
                if await request.is_disconnected():
                    return
                yield "\n"  # keep-alive: lets both sides notice a dead connection

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @app.post("/v1/runs/{rid}/cancel")
    def cancel(rid: str):
        return worker.cancel(rid)

    @app.post("/v1/sessions/{sid}/override")
    async def override(sid: str, body: OverrideRequest, request: Request):
        answer = await worker.override_async(sid, body.axis, body.slice, body.prompts)
        # from the request reaching the app to the answer ready: the rest of a client's wait is the
        # network and the time the request waited for the event loop (e.g. behind others' overrides)
        answer["worker_seconds"] = round(time.perf_counter() - request.state.arrived, 5)
        if isinstance(answer.get("mask"), bytes):  # a large slice's mask, encoded on the override's thread
            body = answer.pop("mask")
            head = json.dumps(answer)
            return Response(head[:-1].encode() + b', "mask": ' + body + b"}", media_type="application/json")
        # JSONResponse directly: the mask's run lengths need no jsonable_encoder walk (a person is waiting)
        return JSONResponse(answer)

    @app.post("/v1/sessions/{sid}/continue")
    def continue_slice(sid: str, body: ContinueRequest):
        run = worker.continue_slice(sid, body.axis, body.slice, body.target, body.turns)
        return {"run": run.id}

    @app.get("/v1/sessions/{sid}/slices/{axis}/{index}")
    def slice_info(sid: str, axis: str, index: int):
        return worker.slice_info(sid, axis, index)

    @app.post("/v1/shutdown")
    def shutdown():
        if worker.on_shutdown is not None:
            threading.Timer(0.2, worker.on_shutdown).start()
        return {"stopping": True}

    return app


def exit_with_parent(pid: int, on_gone: Callable[[], None], every_s: float = 1.0) -> threading.Thread:
    """Watches process ``pid`` (the program that started the worker: Slicer) on a daemon thread and
    calls ``on_gone`` once it has ended, crashed or was killed, so that no orphaned worker keeps
    the GPU's memory.  A new process that reuses the number is told apart by its start time."""
    import psutil

    def watch():
        try:
            born = psutil.Process(pid).create_time()
            while True:
                time.sleep(every_s)
                if psutil.Process(pid).create_time() != born:
                    break
        except psutil.Error:  # no such process (any more), or not ours to look at: ended for us
            pass
        on_gone()

    thread = threading.Thread(target=watch, name="medsam-agent-parent-watch", daemon=True)
    thread.start()
    return thread


class WorkerServer:
    """uvicorn serving an app on ``host``:``port`` (0 = a free port), in a thread or in the foreground."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # answers go out at once (connections inherit this): without it a reply's second write waits
        # for the client's delayed ACK, ~40 ms, whenever requests follow each other quickly
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "WorkerServer":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
