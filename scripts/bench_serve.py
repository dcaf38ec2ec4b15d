"""Load test of `apet-export serve` on loopback: N concurrent clients streaming greedy requests.

For each server setting (--settings REPLICASxMAX_BATCH, e.g. 1x16 and 2x8) and each client count (1, 4, 16, 64) it reports
requests/s, generated tokens/s, time to first token p50/p99, errors (must be 0) and whether every greedy
answer equals `apet-export run`'s for the same picture, prompt and budget.

    python scripts/bench_serve.py BUILD_DIR [--settings 1x16,2x16,2x8] [--clients 1,4,16,64] [--json-out rows.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from apet_export.runtime.images import synthetic_image
from apet_export.serve.client import LocalServer, chat_body, data_url, post_chat

PROMPT = "Describe the image."


def run_answers(build: Path, pictures: list[Path], budget: int, max_tokens: int) -> list[str]:
    """`apet-export run --json` per picture: the greedy answers the server must give."""
    answers = []
    for picture in pictures:
        output = subprocess.run(
            [sys.executable, "-m", "apet_export.cli", "run", str(build), "--image", str(picture), "--prompt", PROMPT,
             "--budget", str(budget), "--max-new-tokens", str(max_tokens), "--json"],
            check=True, capture_output=True, text=True,
        ).stdout
        answers.append(json.loads(output.strip().splitlines()[-1])["text"])
    return answers


def load_level(url: str, clients: int, requests: int, urls: list[str], answers: list[str], budget: int,
               max_tokens: int) -> dict:
    """`requests` streamed greedy requests from `clients` concurrent clients; request i asks about picture i % P."""
    def one(number: int):
        body = chat_body([urls[number % len(urls)]], PROMPT, max_tokens=max_tokens, budget=budget, stream=True,
                         stream_options={"include_usage": True})
        try:
            return number, post_chat(url, body)
        except OSError as error:
            return number, error

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    good = [(n, r) for n, r in results if not isinstance(r, Exception) and r.status == 200 and r.done]
    ttft = np.array([r.first_token_s for _, r in good if r.first_token_s is not None]) * 1e3
    tokens = sum(r.usage["completion_tokens"] for _, r in good)
    return {
        "clients": clients, "requests": requests, "errors": requests - len(good),
        "requests_per_s": round(requests / wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1) if len(ttft) else None,
        "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 1) if len(ttft) else None,
        "same_as_run": all(r.text == answers[n % len(answers)] for n, r in good) and len(good) == requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--settings", default="1x16,2x16,2x8",
                        help="server settings to compare: REPLICASxMAX_BATCH, comma-separated")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=2, help="at least 8 requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--pictures", type=int, default=4, help="distinct synthetic pictures asked about")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        pictures = []
        for seed in range(args.pictures):
            pictures.append(Path(folder) / f"picture-{seed}.png")
            synthetic_image(seed).save(pictures[-1])
        answers = run_answers(args.build, pictures, args.budget, args.max_tokens)
        urls = [data_url(p) for p in pictures]
        rows = []
        for setting in args.settings.split(","):
            replicas, max_batch = (int(n) for n in setting.split("x"))
            server = LocalServer(args.build, "--replicas", str(replicas), "--max-batch", str(max_batch),
                                 log=Path(folder) / f"serve-{setting}.log")
            try:
                server.wait_healthy()
                post_chat(server.url, chat_body([urls[0]], PROMPT, max_tokens=2))  # warm up every lazy path
                for clients in [int(c) for c in args.clients.split(",")]:
                    row = {"replicas": replicas, "max_batch": max_batch, **load_level(
                        server.url, clients, max(8, clients * args.requests_per_client), urls, answers,
                        args.budget, args.max_tokens)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                status = server.stop()
                if status != 0:
                    print(f"server exited with {status}:\n{server.log_tail()}", file=sys.stderr)
    header = ["replicas", "max_batch", "clients", "requests", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
              "errors", "same_as_run"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    if any(row["errors"] or not row["same_as_run"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
