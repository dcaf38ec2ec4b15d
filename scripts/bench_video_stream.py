"""Time to first token for a streamed video: 8 frames at 33 tokens/frame (CLS + 32 kept) vs uncompressed (257).

Frames arrive one every --interval-ms (a camera or a decoder); the pipeline encodes each as it arrives. The
figure that matters is the time from the last frame's arrival to the first token: with streaming it is the
last frame's encoding plus the prefill of the compressed tokens. For comparison the same frames are also
given all at once after the last has arrived (every frame encoded, then prefill), and both at no compression.
All cases run in one process, medians of --runs, on the build's onnxruntime backend (or --backend torch).

    python scripts/bench_video_stream.py                                  # builds tiny-video-llava
    python scripts/bench_video_stream.py --model bench-video-llava-clip-l-qwen2-0.5b --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from apet_export.export.build import BuildOptions, build
from apet_export.runtime.pipeline import Pipeline
from apet_export.runtime.video import synthetic_frames

PROMPT = "What happens in the video?"


def camera(frames, interval_s: float):
    """Yield the frames in real time: frame i is available interval_s after frame i-1."""
    for frame in frames:
        time.sleep(interval_s)
        yield frame


def first_token_after_last_frame(pipeline: Pipeline, frames, budget: int, streamed: bool, interval_s: float) -> dict:
    if streamed:
        generation = pipeline.generate_video(
            camera(frames, interval_s), PROMPT, budget=budget, num_frames=len(frames), max_new_tokens=1
        )
        result = generation.run()
        ttft = result.first_token_ms  # from the arrival of the last frame
    else:
        arrived = list(camera(frames, interval_s))  # wait for the whole clip, then encode it all
        start = time.perf_counter()
        result = pipeline.generate_video(arrived, PROMPT, budget=budget, max_new_tokens=1, stream=False)
        ttft = (time.perf_counter() - start) * 1e3
    return {"ttft_ms": ttft, "prefill_ms": result.prefill_ms, "vision_ms": result.vision_ms,
            "llm_tokens": result.prompt_tokens + result.image_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-video-llava")
    parser.add_argument("--build-dir", type=Path, help="reuse this build instead of building --model")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--tokens-per-frame", type=int, default=32, help="kept per frame (+ the CLS row = 33)")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="time between frame arrivals")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        build_dir = args.build_dir
        if build_dir is None:
            build_dir = Path(scratch) / args.model
            build(BuildOptions(model=args.model, out=build_dir))
        frames = synthetic_frames(args.frames)
        rows = []
        with Pipeline.from_dir(build_dir, backend=args.backend) as pipeline:
            full = pipeline.manifest.budget["max"]
            cases = [(per_frame, streamed) for per_frame in (args.tokens_per_frame, full) for streamed in (True, False)]
            for per_frame, streamed in cases:
                budget = per_frame * args.frames
                first_token_after_last_frame(pipeline, frames, budget, streamed, 0.0)  # warm-up
                runs = [first_token_after_last_frame(pipeline, frames, budget, streamed, args.interval_ms / 1e3)
                        for _ in range(args.runs)]
                rows.append({
                    "tokens_per_frame": per_frame + pipeline.manifest.dims.get("prefix_tokens", 0),
                    "mode": "streamed" if streamed else "all frames at the end",
                    **{key: statistics.median(run[key] for run in runs) for key in runs[0]},
                })
    reference = next(r for r in rows if r["mode"] == "streamed" and r["tokens_per_frame"] > args.tokens_per_frame + 1)
    print(f"{args.frames} frames, {args.backend}, frame interval {args.interval_ms:g} ms, median of {args.runs}")
    print(f"{'tokens/frame':>12} {'mode':>22} {'LLM tokens':>10} {'TTFT after last frame ms':>25} "
          f"{'prefill ms':>10} {'vision ms (all frames)':>22} {'TTFT vs streamed uncompressed':>30}")
    for row in rows:
        row["speedup_vs_streamed_uncompressed"] = reference["ttft_ms"] / row["ttft_ms"]
        print(f"{row['tokens_per_frame']:>12} {row['mode']:>22} {row['llm_tokens']:>10} {row['ttft_ms']:>25.1f} "
              f"{row['prefill_ms']:>10.1f} {row['vision_ms']:>22.1f} {row['speedup_vs_streamed_uncompressed']:>29.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
