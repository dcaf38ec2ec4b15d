"""The real server on loopback: answers equal `apet-export run`'s, concurrency, bad requests, disconnects.

One server for the session (conftest.py); its teardown checks that SIGTERM exits 0 with no Ray process left.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner
from PIL import Image

from apet_export.cli import cli
from apet_export.runtime.images import synthetic_image
from apet_export.serve.client import chat_body, data_url, get_json, post_chat
from tests.serve.conftest import API_KEY, MAX_BODY_MB

# Every test here talks to the real server, which takes ~1 min to start on 2 cores: `slow` (.ci/run runs
# `-m slow tests/serve`). The default run keeps the server's parts that need no Ray: tests/serve/test_encode_batch.py
# (the batched vision call) and the option checks of test_serve_lifecycle.py.
pytestmark = pytest.mark.slow

PROMPT = "Describe the image."
BUDGET = 32
MAX_TOKENS = 12


def run_command(build, image_path, prompt=PROMPT, budget=BUDGET, max_new_tokens=MAX_TOKENS, extra=()):
    """`apet-export run ... --json`: (summary dict, None) or (None, the error it refused with)."""
    result = CliRunner().invoke(cli, ["run", str(build), "--image", str(image_path), "--prompt", prompt, "--budget",
                                      str(budget), "--max-new-tokens", str(max_new_tokens), "--json", *extra])
    if result.exception is not None:
        return None, result.exception
    return json.loads(result.output.strip().splitlines()[-1]), None


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "picture.png"
    synthetic_image(3).save(path)
    return path


@pytest.fixture(scope="module")
def run_answer(llava_build, picture):
    summary, error = run_command(llava_build, picture)
    assert error is None, error
    return summary


def ask(server, picture, **fields):
    body = chat_body([data_url(picture)], PROMPT, max_tokens=MAX_TOKENS, budget=BUDGET, **fields)
    return post_chat(server.url, body, api_key=API_KEY)


def test_health_and_models(server):
    status, health = get_json(server.url, "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == server_model(server)
    status, models = get_json(server.url, "/v1/models", api_key=API_KEY)
    assert status == 200 and [m["id"] for m in models["data"]] == [health["model"]]


def server_model(server):
    return get_json(server.url, "/health")[1]["model"]


def test_non_stream_answer_equals_run(server, picture, run_answer):
    reply = ask(server, picture)
    assert reply.status == 200, reply.json
    assert reply.text == run_answer["text"]
    usage = reply.usage
    assert usage["completion_tokens"] == run_answer["generated_tokens"]
    assert run_answer["image_tokens"] == BUDGET
    assert usage["prompt_tokens_details"] == {"text_tokens": run_answer["prompt_tokens"], "image_tokens": BUDGET}
    assert usage["prompt_tokens"] == run_answer["prompt_tokens"] + BUDGET
    assert reply.json["choices"][0]["finish_reason"] == {"length": "length", "eos": "stop"}[run_answer["finish_reason"]]


def test_stream_answer_equals_run(server, picture, run_answer):
    reply = ask(server, picture, stream=True, stream_options={"include_usage": True})
    assert reply.status == 200 and reply.done
    assert reply.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len([c for c in reply.chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]) > 1
    assert reply.text == run_answer["text"]
    assert reply.usage["completion_tokens"] == run_answer["generated_tokens"]
    finish = [c["choices"][0]["finish_reason"] for c in reply.chunks if c.get("choices")]
    assert finish[-1] in ("length", "stop") and set(finish[:-1]) == {None}


def test_seeded_sampling_equals_run(server, llava_build, picture):
    expected, error = run_command(llava_build, picture, extra=["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"])
    assert error is None, error
    replies = [ask(server, picture, temperature=0.9, top_p=0.95, seed=7, stream=stream) for stream in (False, True)]
    assert [r.text for r in replies] == [expected["text"]] * 2


def test_16_concurrent_greedy_requests_match_run_and_share_vision_batches(server, picture, run_answer):
    before = get_json(server.url, "/health")[1]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: ask(server, picture, stream=bool(i % 2)), range(16)))
    after = get_json(server.url, "/health")[1]
    assert [r.status for r in replies] == [200] * 16
    assert [r.text for r in replies] == [run_answer["text"]] * 16
    requests = after["vision_requests"] - before["vision_requests"]
    batches = after["vision_batches"] - before["vision_batches"]
    assert requests == 16 and batches < requests, (batches, requests)  # some encodes ran together
    assert after["running"] == 0


def bomb_png(path, side):
    Image.new("1", (side, side)).save(path)  # side^2 pixels in a few kB
    return path


REFUSED_PICTURES = {
    "strip": lambda path: Image.new("RGB", (2000, 4), "red").save(path),  # 500:1
    "oversized": lambda path: bomb_png(path, 10_000),  # 100 M pixels, over PIL's 89 M limit: refused by check_size
    "bomb": lambda path: bomb_png(path, 14_000),  # 196 M > 2 x the limit: refused by PIL at open
    "not_an_image": lambda path: path.write_bytes(b"GIF89a but not really" * 10),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_PICTURES))
def test_pictures_run_refuses_are_refused_with_its_message(server, llava_build, tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    REFUSED_PICTURES[kind](path)
    _, refusal = run_command(llava_build, path)
    assert refusal is not None and type(refusal).__name__ == "ImageError"
    reply = post_chat(server.url, chat_body([data_url(path)], PROMPT, max_tokens=4), api_key=API_KEY)
    assert reply.status == 400 and reply.json["error"]["code"] == "invalid_image"
    assert reply.json["error"]["message"] == str(refusal).replace(str(path), "media part 1 (image/png)")


def picture_url():
    return data_url(synthetic_image(1, (64, 48)))


BAD_REQUESTS = {  # name: (body, HTTP status, error code)
    "malformed_json": (b'{"messages": [', 400, "invalid_json"),
    "no_image": ({"messages": [{"role": "user", "content": PROMPT}]}, 400, "missing_image"),
    "bad_base64": (chat_body(["data:image/png;base64,iVBORw0K***"], PROMPT), 400, "invalid_base64"),
    "remote_url": (chat_body(["https://example.com/cat.png"], PROMPT), 400, "remote_url_refused"),
    "unknown_part_type": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400, "unknown_content_type"),
    "budget_out_of_range": (chat_body([picture_url()], PROMPT, budget=100_000), 400, "invalid_budget"),
    "budget_below_basis": (chat_body([picture_url()], PROMPT, budget=3), 400, "invalid_budget"),
    "budget2_on_one_stage_build": (chat_body([picture_url()], PROMPT, budget1=64, budget2=32), 400, "invalid_request"),
    "prompt_over_context": (chat_body([picture_url()], "word " * 4000), 400, "context_length_exceeded"),
    "max_tokens_not_integer": (chat_body([picture_url()], PROMPT, max_tokens="many"), 400, "invalid_value"),
    "two_turns": ({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": PROMPT}]}, 400, "unsupported_messages"),
    "unknown_model": (chat_body([picture_url()], PROMPT, model="gpt-4o"), 404, "model_not_found"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_openai_error(server, name):
    body, status, code = BAD_REQUESTS[name]
    reply = post_chat(server.url, body, api_key=API_KEY)
    assert reply.status == status, reply.json
    error = reply.json["error"]
    assert error["code"] == code and error["type"] and len(error["message"]) > 20


def test_api_key_required_and_compared(server, picture):
    body = chat_body([data_url(picture)], PROMPT, max_tokens=2)
    for key in (None, "test-key-0123456788", API_KEY + "x", ""):
        reply = post_chat(server.url, body, api_key=key)
        assert reply.status == 401 and reply.json["error"]["code"] == "invalid_api_key", key


def raw_request(server, head: bytes, body: bytes = b"", timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as conn:
        conn.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            piece = conn.recv(65536)
            if not piece:
                break
            received += piece
        return received


def test_body_over_the_limit_is_refused_before_it_is_sent(server):
    size = (MAX_BODY_MB + 100) * 1024 * 1024
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
    response = raw_request(server, head, b'{"messages": [')  # the rest of the body is never sent
    assert response.startswith(b"HTTP/1.1 413"), response[:200]


def test_chunked_body_over_the_limit_is_refused_once_past_it(server):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"x" * (1024 * 1024)
    chunks = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (MAX_BODY_MB + 1) + b"0\r\n\r\n"
    response = raw_request(server, head, chunks)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]


def test_client_disconnect_mid_stream_frees_its_slot(server, picture):
    before = get_json(server.url, "/health")[1]
    body = json.dumps(chat_body([data_url(picture)], PROMPT, max_tokens=1900, stream=True)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(head + body)
        received = b""
        while received.count(b"data: ") < 4:  # the answer is streaming
            received += conn.recv(4096)
        assert get_json(server.url, "/health")[1]["running"] == before["running"] + 1
    deadline = time.monotonic() + 15
    while (health := get_json(server.url, "/health")[1])["running"] > before["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health["running"] == before["running"]
    assert health["cancelled"] == before["cancelled"] + 1  # stopped early, not run to its 1900 tokens


def test_still_serving_after_bad_requests(server, picture, run_answer):
    assert ask(server, picture).text == run_answer["text"]
