"""Cold start of `apet-export run`: from process start to the first generated token on stdout, and the process's
peak RSS, for one or more checkouts of the code, alternating between them run by run.

    python scripts/cold_run.py BUILD_DIR --code before=/path/to/old/checkout --code after=. --runs 3

Each run is a fresh `python -m apet_export.cli run BUILD_DIR --json` process started in the checkout (with
PYTHONPATH set to it), under /usr/bin/time -v (its "Maximum resident set size"); the first `{"event": "token"}` line marks
the first token. Prints one line per run, then the median per checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def cold_run(code: str, build: str, prompt: str, tokens: int) -> tuple[float, float, float]:
    """(seconds to the first token, seconds to exit, peak RSS in MiB) of one fresh `run` process."""
    code = os.path.abspath(code)
    env = {**os.environ, "PYTHONPATH": code, "PYTHONDONTWRITEBYTECODE": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "apet_export.cli", "run", build, "--prompt", prompt,
               "--max-new-tokens", str(tokens), "--json"]
    start = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    process = subprocess.Popen(command, env=env, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    for line in process.stdout:
        if first is None and line.startswith('{"event": "token"'):
            first = time.perf_counter() - start
    _, stderr = process.communicate()
    total = time.perf_counter() - start
    if process.returncode != 0 or first is None:
        raise SystemExit(f"run failed ({process.returncode}):\n{stderr}")
    kib = next(int(line.split(":")[1]) for line in stderr.splitlines() if "Maximum resident set size" in line)
    return first, total, kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--code", action="append", required=True, help="NAME=CHECKOUT (repeatable)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    checkouts = dict(entry.split("=", 1) for entry in args.code)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in checkouts}
    for run in range(args.runs):
        for name, code in checkouts.items():  # alternating: load drifts on a shared machine hit all alike
            first, total, rss = cold_run(code, args.build, args.prompt, args.max_new_tokens)
            results[name].append((first, total, rss))
            print(f"run {run + 1} {name:>8}: first token {first:6.2f} s, exit {total:6.2f} s, peak RSS {rss:6.0f} MiB",
                  flush=True)
    for name, rows in results.items():
        first, total, rss = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"median   {name:>8}: first token {first:6.2f} s, exit {total:6.2f} s, peak RSS {rss:6.0f} MiB")


if __name__ == "__main__":
    main()
