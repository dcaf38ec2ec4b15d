"""The OpenAI chat-completions shapes the server speaks: one parsed request, response bodies, chunks, errors.

A request is one user turn: text parts (joined by newlines) and media parts (`image_url` with a `data:`
URL; a video build also takes a `data:video/...` URL in an `image_url` or `video_url` part). The images
go before the prompt, as `apet-export run` places them. ApET extensions: `budget`, `budget1`, `budget2`,
and `frames` (frames sampled from a video data URL, default 8 as in `run --frames`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

REMOTE_SCHEMES = ("http:", "https:", "ftp:", "file:", "s3:", "gs:")


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI error object."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


@dataclass
class MediaPart:
    kind: str  # "image" | "video"
    media_type: str  # from the data URL, e.g. "image/png"
    data: bytes  # decoded base64 payload
    number: int  # 1-based position among the request's media parts (for error messages)


@dataclass
class ChatRequest:
    prompt: str
    media: list[MediaPart]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    budget: int | None = None
    budget1: int | None = None
    budget2: int | None = None
    frames: int = 8
    model: str | None = None
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}): send a JSON object", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}, not an object", "invalid_json")
    return body


def _integer(body: dict, name: str, low: int | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", "invalid_value", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be >= {low}, got {value}", "invalid_value", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", "invalid_value", param=name)
    return float(value)


def decode_data_url(url, number: int) -> tuple[str, bytes]:
    """(media type, payload) of a base64 `data:` URL; remote URLs are refused (the server fetches nothing)."""
    import base64
    import binascii

    if not isinstance(url, str):
        raise ApiError(400, f"media part {number}: the url must be a string", "invalid_value", param="messages")
    if url[:6].lower() in REMOTE_SCHEMES or "://" in url[:12]:
        raise ApiError(
            400, f"media part {number}: remote URLs are refused (the server fetches nothing): send the picture "
            f"inline as data:image/png;base64,...", "remote_url_refused", param="messages",
        )
    if not url.startswith("data:") or "," not in url:
        raise ApiError(400, f"media part {number}: expected a data: URL (data:image/png;base64,...)", "invalid_url",
                       param="messages")
    header, payload = url[5:].split(",", 1)
    parameters = header.split(";")
    if "base64" not in parameters[1:]:
        raise ApiError(400, f"media part {number}: the data URL must be base64 (data:image/png;base64,...)",
                       "invalid_url", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, f"media part {number}: the base64 payload does not decode ({error})", "invalid_base64",
                       param="messages") from None
    if not data:
        raise ApiError(400, f"media part {number}: the data URL is empty", "invalid_base64", param="messages")
    return parameters[0].lower() or "application/octet-stream", data


def _content_parts(content) -> tuple[list[str], list[MediaPart]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, "message content must be a string or a list of parts", "invalid_value", param="messages")
    texts, media = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, "a text part needs a string `text`", "invalid_value", param="messages")
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            reference = part.get(kind)
            url = reference.get("url") if isinstance(reference, dict) else reference
            media_type, data = decode_data_url(url, len(media) + 1)
            video = kind == "video_url" or media_type.startswith("video/")
            media.append(MediaPart("video" if video else "image", media_type, data, len(media) + 1))
        else:
            raise ApiError(
                400, f"unknown content part type {kind!r}: use text, image_url (data: URLs) or video_url",
                "unknown_content_type", param="messages",
            )
    return texts, media


def parse_chat_request(body: dict) -> ChatRequest:
    """A checked ChatRequest from a /v1/chat/completions body, or an ApiError naming what is wrong."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_value", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ApiError(
            400, "send exactly one message, with role user: the build answers one question about its images "
            "(system prompts and earlier turns are not supported)", "unsupported_messages", param="messages",
        )
    texts, media = _content_parts(messages[0].get("content"))
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", "invalid_value", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "invalid_value", param="stream")
    options = body.get("stream_options") or {}
    max_tokens = _integer(body, "max_completion_tokens", 1, None)
    return ChatRequest(
        prompt="\n".join(texts), media=media, stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        max_tokens=max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1, 64),
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0), top_p=_number(body, "top_p", 1e-9, 1.0, 1.0),
        seed=_integer(body, "seed"), budget=_integer(body, "budget"), budget1=_integer(body, "budget1"),
        budget2=_integer(body, "budget2"), frames=_integer(body, "frames", 1, 8),
        model=body.get("model") if isinstance(body.get("model"), str) else None,
    )


def usage(result) -> dict:
    """OpenAI usage from a GenerationResult: the prompt counts its text and image tokens (details split them)."""
    prompt = result.prompt_tokens + result.image_tokens
    return {
        "prompt_tokens": prompt, "completion_tokens": len(result.token_ids),
        "total_tokens": prompt + len(result.token_ids),
        "prompt_tokens_details": {"text_tokens": result.prompt_tokens, "image_tokens": result.image_tokens},
    }


def finish_reason(result) -> str:
    return "stop" if result.finish_reason == "eos" else "length"


def completion(request: ChatRequest, model: str, result) -> dict:
    return {
        "id": request.request_id, "object": "chat.completion", "created": request.created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": finish_reason(result)}],
        "usage": usage(result),
    }


def chunk(request: ChatRequest, model: str, delta: dict, reason: str | None = None, choices: bool = True,
          usage_block: dict | None = None) -> bytes:
    """One server-sent event: `data: {chat.completion.chunk}`."""
    body = {"id": request.request_id, "object": "chat.completion.chunk", "created": request.created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}] if choices else []}
    if usage_block is not None:
        body["usage"] = usage_block
    return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
