"""A small standard-library client of the server (the load test and the tests use it; any OpenAI client works).

    body = chat_body([image], "Describe the image.", max_tokens=16)
    reply = post_chat("http://127.0.0.1:8000", body)            # reply.status, reply.text, reply.json
    reply = post_chat("http://127.0.0.1:8000", {**body, "stream": True})   # reply.text joined from the chunks

LocalServer runs `apet-export serve` as a child process on a free loopback port (load tests, tests).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image


def data_url(image: Image.Image | str | Path | bytes, media_type: str = "image/png") -> str:
    """A base64 data: URL of a PIL image (as PNG), a file's bytes, or raw bytes."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payload = buffer.getvalue()
    elif isinstance(image, bytes):
        payload = image
    else:
        payload = Path(image).read_bytes()
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


def chat_body(images: list, prompt: str, **fields) -> dict:
    """A /v1/chat/completions body: one user message with the images (data URLs) then the prompt."""
    parts = [{"type": "image_url", "image_url": {"url": image if isinstance(image, str) else data_url(image)}}
             for image in images]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}], **fields}


@dataclass
class Reply:
    status: int
    json: dict | None = None  # the whole body (non-stream, or an error)
    body: str | None = None  # a body that is not JSON
    chunks: list[dict] = field(default_factory=list)  # stream: each data: event's object
    done: bool = False  # stream: the [DONE] event arrived
    first_token_s: float | None = None  # from sending the request to the first text delta
    total_s: float = 0.0

    @property
    def text(self) -> str:
        if self.json is not None and "choices" in self.json:
            return self.json["choices"][0]["message"]["content"]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in self.chunks if c.get("choices"))

    @property
    def usage(self) -> dict | None:
        if self.json is not None:
            return self.json.get("usage")
        return next((c["usage"] for c in self.chunks if c.get("usage")), None)


def connection(url: str, timeout: float = 300.0) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


def post_chat(url: str, body: dict | bytes, api_key: str | None = None, timeout: float = 300.0,
              headers: dict | None = None) -> Reply:
    """POST /v1/chat/completions and read the whole answer (the events one by one when streaming)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
            **(headers or {})}
    start = time.perf_counter()
    conn = connection(url, timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=raw, headers=sent)
        response = conn.getresponse()
        reply = Reply(response.status)
        if not response.getheader("content-type", "").startswith("text/event-stream"):
            raw = response.read()
            try:
                reply.json = json.loads(raw or b"null")
            except ValueError:  # not from the application (e.g. Ray's proxy while the server stops)
                reply.body = raw.decode(errors="replace")
            if reply.json is not None and "choices" in reply.json:
                reply.first_token_s = time.perf_counter() - start  # the whole answer at once
        else:
            for line in response:  # http.client de-chunks the body; events are separated by blank lines
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    reply.done = True
                    break
                event = json.loads(line[6:])
                if reply.first_token_s is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    reply.first_token_s = time.perf_counter() - start
                reply.chunks.append(event)
        reply.total_s = time.perf_counter() - start
        return reply
    finally:
        conn.close()


def get_json(url: str, path: str, api_key: str | None = None, timeout: float = 30.0) -> tuple[int, dict | None]:
    conn = connection(url, timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw or b"null")
        except ValueError:  # not from the application: Ray's proxy before the model is deployed, or while stopping
            return response.status, None
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """`apet-export serve BUILD [options]` as a child process on a free loopback port; its output goes to `log`."""

    def __init__(self, build: str | Path, *options: str, log: str | Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        command = [sys.executable, "-m", "apet_export.cli", "serve", str(build), "--port", str(self.port), *options]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT)

    def log_tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:]

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Until GET /health answers 200 (the model is loaded); RuntimeError with the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if get_json(self.url, "/health", timeout=5)[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the server was not healthy within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM and wait: the exit status. A server that does not stop in time is killed (TimeoutError)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise TimeoutError(f"the server did not stop within {timeout} s after SIGTERM") from None
        return self.process.returncode
