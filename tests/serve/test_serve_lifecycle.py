"""Servers of their own: SIGTERM with a request in flight, a video build; and option errors before Ray starts."""

from __future__ import annotations

import json
import socket
import time

import pytest
from click.testing import CliRunner

from apet_export.cli import cli
from apet_export.runtime.images import synthetic_image
from apet_export.serve.client import chat_body, data_url, post_chat
from tests.serve.conftest import Server


def test_bad_build_or_options_fail_before_ray_starts(tmp_path, llava_build):
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing")])
    assert type(result.exception).__name__ == "ArtifactError" and "manifest" in str(result.exception)
    result = CliRunner().invoke(cli, ["serve", str(llava_build), "--replicas", "0"])
    assert "--replicas must be >= 1" in str(result.exception)
    assert time.monotonic() - start < 10  # no Ray instance was started


def stream_events(conn: socket.socket, until: int) -> bytes:
    received = b""
    while received.count(b"data: ") < until:
        piece = conn.recv(65536)
        if not piece:
            break
        received += piece
    return received


@pytest.mark.slow
def test_sigterm_finishes_in_flight_request_stops_accepting_and_exits_0(llava_build):
    server = Server(llava_build, "--drain-timeout", "60")
    try:
        server.wait_healthy()
        body = json.dumps(chat_body([data_url(synthetic_image(0))], "Describe the image.", max_tokens=1500,
                                    stream=True)).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=120) as conn:
            conn.sendall(head + body)
            received = stream_events(conn, 3)  # the answer is streaming
            stopping = time.monotonic()
            server.process.send_signal(15)
            time.sleep(2.0)
            late = None
            try:  # a request after SIGTERM is not answered with 200
                late = post_chat(server.url, chat_body([data_url(synthetic_image(1))], "Hi", max_tokens=2), timeout=30)
            except OSError:
                pass
            received += stream_events(conn, 10**9)  # to the end of the stream
        status = server.process.wait(120)
        stopped_after = time.monotonic() - stopping
    finally:
        status, left, log = server.finish()
    assert status == 0, log
    assert not left, f"Ray processes left running: {left}"
    assert b"data: [DONE]" in received and b'"finish_reason": "length"' in received  # finished, not cut off
    assert late is None or late.status != 200
    assert stopped_after < 90


@pytest.mark.slow
def test_video_build_answers_like_run_video(video_llava_build, tmp_path):
    from apet_export.runtime.video import synthetic_frames, write_video

    video = write_video(tmp_path / "clip.mp4", synthetic_frames(8))
    result = CliRunner().invoke(cli, ["run", str(video_llava_build), "--video", str(video), "--frames", "4",
                                      "--prompt", "What happens?", "--max-new-tokens", "8", "--json"])
    assert result.exception is None, result.output
    expected = json.loads(result.output.strip().splitlines()[-1])
    server = Server(video_llava_build)
    try:
        server.wait_healthy()
        body = {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
            {"type": "text", "text": "What happens?"}]}], "max_tokens": 8, "frames": 4}
        reply = post_chat(server.url, body)
        frames_reply = post_chat(server.url, chat_body(synthetic_frames(2), "What happens?", max_tokens=8))
        no_video = post_chat(server.url, {"messages": [{"role": "user", "content": "What happens?"}]})
    finally:
        status, left, _ = server.finish()
    assert reply.status == 200 and reply.text == expected["text"], reply.json
    assert reply.usage["prompt_tokens_details"]["image_tokens"] == expected["image_tokens"]
    assert frames_reply.status == 200 and frames_reply.usage["completion_tokens"] > 0
    assert no_video.status == 400 and no_video.json["error"]["code"] == "missing_image"
    assert status == 0 and not left
