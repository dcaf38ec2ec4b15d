"""The Ray Serve deployment: one replica = one Pipeline answering OpenAI chat-completion requests over HTTP.

Within a replica, each request generates in its own thread, token by token, so concurrent requests
share the replica's cores turn about (fair decode); the vision encodes of requests that arrive together
are batched by @serve.batch into one call of Pipeline.encode_batch (the vision graph's batch axis).
More replicas (--replicas) are more processes, on this machine or across the Ray cluster; Ray's proxy
spreads requests across them.

Request flow: auth -> body size (Content-Length first: an oversized body is refused unread) -> JSON ->
protocol.parse_chat_request -> media loaders (`run`'s checks) -> Pipeline.generate (its own budget and
context checks, before the first byte of the answer) -> the answer, whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from apet_export.errors import (
    BudgetError,
    ImageError,
    InvalidInputError,
    PromptTooLongError,
    VideoError,
)
from apet_export.serve import protocol
from apet_export.serve.media import load_images, request_frames
from apet_export.serve.protocol import ApiError

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ModelOptions:
    """What every replica needs to load and serve the build."""

    build_dir: str
    backend: str = "onnxruntime"
    vision_graph: str = "vision"
    max_batch: int = 16  # vision encodes batched together; also the requests one replica runs at once
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    batch_wait_s: float = 0.01  # how long the first request of a vision batch waits for others


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def api_error(error: Exception) -> ApiError:
    """A typed apet-export error as the OpenAI error it becomes (400, with a code per kind)."""
    if isinstance(error, ApiError):
        return error
    codes = [(PromptTooLongError, "context_length_exceeded"), (BudgetError, "invalid_budget"),
             (ImageError, "invalid_image"), (VideoError, "invalid_video"), (InvalidInputError, "invalid_request")]
    for kind, code in codes:
        if isinstance(error, kind):
            return ApiError(400, str(error), code)
    logger.exception("request failed", exc_info=error)
    return ApiError(500, f"the server failed on this request ({type(error).__name__}): see the server log",
                    "internal_error", type="server_error")


class ChatModel:
    """The deployment class (serve.deployment is applied by the launcher, with replicas and CPUs)."""

    def __init__(self, options: ModelOptions):
        from apet_export.runtime.pipeline import Pipeline

        self.options = options
        self.pipeline = Pipeline.from_dir(options.build_dir, backend=options.backend, vision_graph=options.vision_graph)
        self.model_id = Path(options.build_dir).resolve().name
        self.video = self.pipeline.manifest.dims.get("media", "image") == "video"
        self.encode.set_max_batch_size(options.max_batch)
        self.encode.set_batch_wait_timeout_s(options.batch_wait_s)
        self.vision_thread = ThreadPoolExecutor(1, thread_name_prefix="vision")  # one batch at a time
        # onnxruntime sessions run concurrently from threads; other backends reuse buffers: one step at a time
        self.step_lock = threading.Lock() if options.backend != "onnxruntime" else None
        self.prepare_lock = threading.Lock()  # tokenizer calls of concurrent requests, one at a time
        self.created = int(time.time())
        # what /health reports: generations running now, ones stopped early because the client left, and
        # the vision batches run for how many requests (batches < requests: encodes were batched)
        self.stats = {"running": 0, "cancelled": 0, "vision_batches": 0, "vision_requests": 0}
        self.stats_lock = threading.Lock()

    def __del__(self):  # Ray Serve calls it when the replica stops (after its in-flight requests)
        if hasattr(self, "vision_thread"):  # (absent when __init__ failed part-way)
            self.vision_thread.shutdown(wait=False)
        if hasattr(self, "pipeline"):
            self.pipeline.close()

    def count(self, name: str, change: int = 1) -> None:
        with self.stats_lock:
            self.stats[name] += change

    # -- vision: concurrent requests' encodes batched --------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, requests: list[tuple[list, int | None]]) -> list[tuple]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.vision_thread, self._encode_batch, requests)

    def _encode_batch(self, requests):
        self.count("vision_batches")
        self.count("vision_requests", len(requests))
        if self.step_lock is None:
            return self.pipeline.encode_batch(requests)
        with self.step_lock:
            return self.pipeline.encode_batch(requests)

    # -- HTTP -----------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        try:
            return await self.route(request)
        except ApiError as error:
            return error_response(error)

    async def route(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}
        if path not in routes:
            raise ApiError(404, f"no route {path}: use POST /v1/chat/completions, GET /v1/models or GET /health",
                           "not_found", type="not_found_error")
        if method != routes[path]:
            raise ApiError(405, f"{path} takes {routes[path]}, not {method}", "method_not_allowed")
        if path == "/health":
            return JSONResponse({"status": "ok", "model": self.model_id, **self.stats})
        self.check_api_key(request)
        if path == "/v1/models":
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "apet-export"}]})
        body = protocol.parse_json(await self.read_body(request))
        chat = protocol.parse_chat_request(body)
        if chat.model is not None and chat.model != self.model_id:
            raise ApiError(404, f"model {chat.model!r} is not served here: use {self.model_id!r} (GET /v1/models)",
                           "model_not_found", type="not_found_error", param="model")
        return await self.chat_completion(chat)

    def check_api_key(self, request: Request) -> None:
        if self.options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.options.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           "invalid_api_key", type="authentication_error")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 before it is read when Content-Length says it is over the limit (and,
        without Content-Length, as soon as the bytes received pass it)."""
        limit = self.options.max_body_bytes
        too_large = ApiError(413, f"the request body is over the server's limit of {limit} bytes: send smaller "
                             f"or fewer pictures (or start the server with a larger --max-body-mb)",
                             "request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, f"Content-Length {length!r} is not a number", "invalid_request")
            if int(length) > limit:
                raise too_large
        received = bytearray()
        try:
            async for piece in request.stream():
                received += piece
                if len(received) > limit:
                    raise too_large
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected while sending the body", "client_disconnected") from None
        return bytes(received)

    # -- generation -------------------------------------------------------------------------------------
    def start(self, chat: protocol.ChatRequest, loop: asyncio.AbstractEventLoop):
        """Load the media and start the Generation (its checks run here, before any answer is sent)."""
        sampling = dict(max_new_tokens=chat.max_tokens, temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed)
        if self.video:
            if chat.budget1 is not None or chat.budget2 is not None:
                raise InvalidInputError("budget1/budget2 are for two-stage image builds: send budget for a video")
            if not chat.media:
                raise ApiError(400, "this build answers about a video: add a video_url part (data:video/mp4;base64,"
                               "...) or its frames as image_url parts", "missing_image", param="messages")
            frames = request_frames(chat.media, chat.frames)
            with self.prepare_lock:
                return self.pipeline.generate_video(frames, chat.prompt, budget=chat.budget, **sampling)
        if not chat.media:
            raise ApiError(400, "this build answers about images: add an image_url part (data:image/png;base64,...)",
                           "missing_image", param="messages")
        images = load_images(chat.media)

        def encode(images, budget):  # called from the generation thread: join this replica's next vision batch
            return asyncio.run_coroutine_threadsafe(self.encode((images, budget)), loop).result()

        with self.prepare_lock:
            return self.pipeline.generate(images, chat.prompt, budget=chat.budget, budget1=chat.budget1,
                                          budget2=chat.budget2, encode=encode, **sampling)

    def produce(self, generation, events: asyncio.Queue, loop, cancelled: threading.Event) -> None:
        """The generation thread: token events into the queue until done, failed, or the client left."""
        def put(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        steps = generation.events()
        self.count("running")
        try:
            while True:
                if cancelled.is_set():
                    self.count("cancelled")
                    return
                if self.step_lock is None:
                    event = next(steps, None)
                else:
                    with self.step_lock:
                        event = next(steps, None)
                if event is None:
                    put(("done", generation.result))
                    return
                put(("token", event))
        except BaseException as error:  # noqa: B036 - handed to the request's coroutine, which reports it
            put(("error", error))
        finally:
            steps.close()
            self.count("running", -1)

    async def chat_completion(self, chat: protocol.ChatRequest) -> Response:
        loop = asyncio.get_running_loop()
        try:
            generation = await asyncio.to_thread(self.start, chat, loop)
        except Exception as error:  # noqa: BLE001 - each kind becomes its HTTP error
            raise api_error(error) from None
        events, cancelled = asyncio.Queue(), threading.Event()
        threading.Thread(target=self.produce, args=(generation, events, loop, cancelled), daemon=True,
                         name=f"generate-{chat.request_id[-8:]}").start()
        if chat.stream:
            return StreamingResponse(self.stream(chat, events, cancelled), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, item = await events.get()
                if kind == "error":
                    raise api_error(item)
                if kind == "done":
                    return JSONResponse(protocol.completion(chat, self.model_id, item))
        finally:
            cancelled.set()  # the client left (the request was cancelled) or it finished: stop generating

    async def stream(self, chat: protocol.ChatRequest, events: asyncio.Queue, cancelled: threading.Event):
        """Server-sent events: a role chunk, one chunk per text delta, the finish chunk, usage if asked, [DONE]."""
        try:
            yield protocol.chunk(chat, self.model_id, {"role": "assistant", "content": ""})
            while True:
                kind, item = await events.get()
                if kind == "token":
                    if item.text:
                        yield protocol.chunk(chat, self.model_id, {"content": item.text})
                elif kind == "done":
                    yield protocol.chunk(chat, self.model_id, {}, protocol.finish_reason(item))
                    if chat.include_usage:
                        yield protocol.chunk(chat, self.model_id, {}, choices=False, usage_block=protocol.usage(item))
                    break
                else:  # the status line is sent: report the failure in the stream
                    yield f"data: {json.dumps(api_error(item).body())}\n\n".encode()
                    break
            yield protocol.DONE
        finally:
            cancelled.set()  # also when the client disconnected: the generation thread stops at its next token
