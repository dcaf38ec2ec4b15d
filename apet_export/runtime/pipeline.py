"""The streaming pipeline: image(s) + prompt -> vision (+ ApET) -> embed merge -> prefill -> decode loop.

    pipeline = Pipeline.from_dir("build/tiny-llava", backend="onnxruntime")
    generation = pipeline.generate([image], "Describe the image.", budget=64, max_new_tokens=32)
    for delta in generation:          # text as it is produced
        print(delta, end="", flush=True)
    generation.result                 # GenerationResult: text, token ids, timings, token counts
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apet_export.errors import InvalidInputError, PipelineClosedError, PromptTooLongError, UnknownNameError
from apet_export.manifest import Manifest, load_manifest
from apet_export.runtime.images import load_image
from apet_export.runtime.sampling import Sampler
from apet_export.runtime.streaming import IncrementalDecoder


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "length"
    prompt_tokens: int  # text tokens of the prompt, image placeholders excluded
    image_tokens: int  # visual tokens after compression, all images
    vision_ms: float
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)  # one per generated token after the first
    first_logits: np.ndarray | None = None  # [V] logits of the first generated token (parity)
    image_tokens_stage2: int | None = None  # two-stage builds: visual tokens that layers >= K see, all images
    first_token_ms: float = 0.0  # from the moment the whole input was there (a stream: its last frame) to the first token

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_ms) / (sum(self.decode_ms) / 1e3) if self.decode_ms else 0.0

    def summary(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
            **({"image_tokens_stage2": self.image_tokens_stage2} if self.image_tokens_stage2 is not None else {}),
            "generated_tokens": len(self.token_ids), "vision_ms": round(self.vision_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3), "first_token_ms": round(self.first_token_ms, 3),
            "decode_ms_per_token": round(float(np.mean(self.decode_ms)), 3) if self.decode_ms else None,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }


@dataclass
class TokenEvent:
    index: int  # 0-based position among the generated tokens
    token_id: int | None  # None for the final flush of a partial character
    text: str  # the text this token completes ('' while a multi-byte character is partial)
    ms: float  # time to produce it (prefill for the first token)


class Generation:
    """Iterate for text deltas (or .events() for one event per token); `.result` holds the
    GenerationResult once iteration has finished."""

    def __init__(self, steps: Iterator[TokenEvent]):
        self._steps, self.result = steps, None

    def events(self) -> Iterator[TokenEvent]:
        self.result = yield from self._steps

    def __iter__(self) -> Iterator[str]:
        for event in self.events():
            if event.text:
                yield event.text

    def run(self) -> GenerationResult:
        for _ in self.events():
            pass
        return self.result


BACKENDS = {"onnxruntime", "torch", "tensorrt"}


def check_prompt(prompt) -> str:
    """A prompt is a str of valid Unicode text (argv decodes undecodable bytes to lone surrogates)."""
    if not isinstance(prompt, str):
        raise InvalidInputError(f"the prompt must be a str, got {type(prompt).__name__}: pass the question as text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raw = prompt[error.start : error.end].encode("utf-8", "surrogateescape")
        raise InvalidInputError(
            f"the prompt is not valid UTF-8 text (bytes {raw!r} at character {error.start}): pass the prompt "
            f"in UTF-8 (check the terminal's or file's encoding)"
        ) from None
    return prompt


def check_count(name: str, value, low: int | None = 1, optional: bool = False) -> None:
    """An integer option (not a float or bool, which would be truncated or read as 1) >= low (None: the
    range is checked where it is known, e.g. a budget against the build's)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise InvalidInputError(f"{name} must be >= {low}, got {value}")


def load_processor(build_dir: Path, manifest: Manifest, backend: str):
    """The build's processor: on onnxruntime and TensorRT the runtime's own, without torch or transformers (the
    tokenizer through the tokenizers library, the image processor in numpy, both read from DIR/model); the
    torch backend, the eager reference, keeps the checkpoint's transformers processor."""
    from apet_export.models.registry import get_family

    family, model_dir = get_family(manifest.family), manifest.model_dir(build_dir)
    if backend == "torch":
        return family.load_processor(model_dir)
    from apet_export.runtime.preprocess import load_image_processor

    return family.runtime_processor(model_dir, load_image_processor(model_dir))


class Pipeline:
    def __init__(self, build_dir: Path, manifest: Manifest, backend, processor):
        from apet_export.models.registry import get_family

        self.build_dir, self.manifest, self.backend, self.processor = build_dir, manifest, backend, processor
        self.tokenizer = processor.tokenizer
        self.family = get_family(manifest.family)  # its contract turns images into LLM rows and their positions
        self.budgets = self.family.budget_policy(manifest)
        self.extras = self._load_extras()  # the build's extra tensors (LLaVA-NeXT's image_newline)

    def _load_extras(self) -> dict:
        if "vision_extras" not in self.manifest.files:
            return {}
        from safetensors.numpy import load_file

        return load_file(str(self.manifest.file(self.build_dir, "vision_extras")))

    def vision_infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The vision graph on this pipeline's backend: a feed -> {image_embeds, keep_index, scores}."""
        return self.backend.vision.infer(feed, check_inputs=False)

    def encode_images(self, images, budget: int | None):
        """PIL images -> (per image its LLM rows [L_i, H], layouts, keep_index) through the family's feeds."""
        return self.family.encode_images(self.vision_infer, self.processor, self.manifest, images, budget, self.extras)

    @classmethod
    def from_dir(cls, build_dir: str | Path, backend: str = "onnxruntime", vision_graph: str = "vision") -> Pipeline:
        build_dir = Path(build_dir)
        manifest = load_manifest(build_dir)
        if backend == "onnxruntime":
            from apet_export.runtime.backends.onnxrt import OnnxrtBackend

            runner = OnnxrtBackend(build_dir, manifest, vision_graph=vision_graph)
        elif backend == "torch":
            from apet_export.compat import require_export_extra

            require_export_extra("the torch backend (eager PyTorch)")
            from apet_export.runtime.backends.torch import TorchBackend

            if vision_graph != "vision":
                raise InvalidInputError(
                    f"vision graph {vision_graph!r} runs on the onnxruntime backend; the torch backend is eager "
                    f"PyTorch: choose backend onnxruntime, or the default vision graph"
                )
            runner = TorchBackend(build_dir, manifest)
        elif backend == "tensorrt":
            from apet_export.runtime.backends.trt import TrtBackend

            runner = TrtBackend(build_dir, manifest, vision_graph=vision_graph)
        else:
            raise UnknownNameError("backend", backend, sorted(BACKENDS))
        manifest.file(build_dir, "llm_a" if manifest.stage2 else "llm")  # a vision-only build cannot generate: say so now
        processor = load_processor(build_dir, manifest, backend)
        try:
            runner.activate()
        except BaseException:
            runner.deactivate()  # release whatever runner did start
            raise
        return cls(build_dir, manifest, runner, processor)

    closed = False

    def close(self) -> None:
        if not self.closed:
            self.backend.deactivate()
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            raise PipelineClosedError(
                "this Pipeline was closed (close() or the end of its `with` block): create a new one with "
                "Pipeline.from_dir"
            )

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompt -------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        """Token ids of the prompt with num_images placeholders of the family's media (images, or one video)."""
        return self.family.prompt_ids(self.tokenizer, prompt, num_images)

    def check_context(self, num_text: int, num_images: int, budget: int, max_new_tokens: int) -> None:
        context = self.manifest.dims["max_context"]
        needed = num_text + num_images * budget + max_new_tokens
        if needed > context:
            raise PromptTooLongError(
                f"the prompt needs {num_text} text + {num_images}x{budget} image tokens + {max_new_tokens} new "
                f"tokens = {needed}, more than the model's context of {context}: shorten the prompt, lower "
                f"--budget or --max-new-tokens"
            )

    def merge_embeddings(self, ids: list[int], image_embeds: np.ndarray) -> np.ndarray:
        """Text embeddings with each image placeholder replaced by that image's T rows: [1, L, H]."""
        image_token_id = self.manifest.dims["image_token_id"]
        text = self.backend.embed(np.asarray([ids], dtype=np.int64))[0]  # [S, H]
        pieces, image = [], 0
        for position, token in enumerate(ids):
            if token == image_token_id:
                pieces.append(image_embeds[image].astype(text.dtype))
                image += 1
            else:
                pieces.append(text[position : position + 1])
        return np.concatenate(pieces)[None]

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self, images, prompt: str, budget: int | None = None, max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream: bool = True,
        budget1: int | None = None, budget2: int | None = None, encode=None,
    ):
        """Generation (iterable of text deltas) if stream, else the GenerationResult. images: one image or a
        list, each a path or a PIL image. On a two-stage build `budget` is the average of the stages (96/32
        for 64) unless budget1/budget2 are given (compression/budget.py). encode: a callable (images, stage-1
        budget) -> what encode_batch gives per request, in place of encoding here (a server batches the vision
        encodes of concurrent requests through it)."""
        self.check_open()
        if self.manifest.dims.get("media", "image") == "video":
            raise InvalidInputError("this build encodes video frames: pass a video (run --video, generate_video)")
        check_prompt(prompt)
        check_count("max_new_tokens", max_new_tokens)
        for name, value in (("budget", budget), ("budget1", budget1), ("budget2", budget2)):
            check_count(name, value, low=None, optional=True)
        if not isinstance(images, list | tuple):  # one image: a path, a PIL image or a numpy array
            images = [images]
        images = [load_image(image) for image in images]  # -> RGB images, read as a viewer shows them
        if not images:
            raise InvalidInputError("at least one image is needed: pass --image")
        # budget None: the family's share of each image's tokens; budget2 None: one stage
        budget, budget2 = self.budgets.resolve(budget, budget1, budget2)
        ids = self.prompt_ids(prompt, len(images))
        image_token_id = self.manifest.dims["image_token_id"]
        if ids.count(image_token_id) != len(images):
            raise InvalidInputError(
                f"the prompt contains the image placeholder {self.tokenizer.image_token!r} itself: remove it "
                f"(each image given is placed before the prompt)"
            )
        num_text = sum(1 for t in ids if t != image_token_id)
        rows_bound = self.budgets.rows_bound(budget)
        self.check_context(num_text, len(images), rows_bound, max_new_tokens)
        sampler = Sampler(temperature, top_p, seed)
        steps = self._steps(images, ids, budget, max_new_tokens, sampler, num_text, budget2, encode)
        generation = Generation(steps)
        return generation if stream else generation.run()

    def encode_batch(self, requests: list[tuple[list, int | None]]) -> list[tuple[list, list, list]]:
        """The vision encodes of several requests at once: [(checked RGB images, stage-1 budget)] -> per request
        the family's encode_images result (rows [L_i, H], layouts, keep_index [T_i] per image). The graph's
        `keep` is one number per call, so the images of all requests that share a budget go through the
        vision graph together, along its batch axis."""
        results = [None] * len(requests)
        by_budget: dict[int | None, list[int]] = {}
        for number, (_, budget) in enumerate(requests):
            by_budget.setdefault(budget, []).append(number)
        for budget, numbers in by_budget.items():
            images = [image for number in numbers for image in requests[number][0]]
            rows, layouts, keep_index = self.encode_images(images, budget)
            start = 0
            for number in numbers:  # back to each request: its own images, in order
                end = start + len(requests[number][0])
                results[number] = (rows[start:end], layouts[start:end], keep_index[start:end])
                start = end
        return results

    def _steps(self, images, ids, budget, max_new_tokens, sampler, num_text, budget2=None, encode=None) -> Iterator[TokenEvent]:
        start = time.perf_counter()
        image_token_id = self.manifest.dims["image_token_id"]
        encode = encode or self.encode_images
        rows, layouts, keep_index = encode(images, budget)  # per image [L_i, H], ...
        embeds = self.merge_embeddings(ids, rows)  # [1, L, H]
        positions, rope_delta = self.family.position_ids(  # [(3,) 1, L]
            ids, image_token_id, layouts, keep_index, length=embeds.shape[1]
        )
        vision_ms = (time.perf_counter() - start) * 1e3
        stage2, image_tokens = {}, sum(len(r) for r in rows)
        image_tokens_stage2 = None  # two-stage builds: the image rows stage 2 cuts (the family's span of each
        if budget2 is not None:  # image's rows, from its first row), how many it keeps, and what layers >= K see
            from apet_export.runtime.two_stage import stage2_spans

            cuts = [self.family.stage2_span(self.manifest, budget2, np.asarray(k)) for k in keep_index]
            stage2 = {"image_spans": stage2_spans(ids, image_token_id, [len(r) for r in rows], cuts)}
            image_tokens_stage2 = image_tokens - sum(length - keep for length, keep in cuts)
        return (yield from self._prefill_and_decode(
            embeds, positions, rope_delta, start, vision_ms, image_tokens, num_text, max_new_tokens,
            sampler, stage2, image_tokens_stage2=image_tokens_stage2,
        ))

    def _prefill_and_decode(
        self, embeds, positions, rope_delta: int, ready: float, vision_ms: float, image_tokens: int, num_text: int,
        max_new_tokens: int, sampler, stage2: dict | None = None, image_tokens_stage2: int | None = None,
    ) -> Iterator[TokenEvent]:
        """embeds [1, L, H] at positions [(3,) 1, L] -> tokens; `ready` is the perf_counter time at which the
        whole input was there; stage2: the two-stage LLM's image spans and budget (empty: one stage)."""
        length = embeds.shape[1]
        start = time.perf_counter()
        logits, cache = self.backend.llm.infer(
            {"inputs_embeds": embeds, "attention_mask": np.ones((1, length), np.int64), "position_ids": positions},
            check_inputs=False, cache=self.backend.new_cache(1), **(stage2 or {}),
        )
        prefill_ms = (time.perf_counter() - start) * 1e3
        first_token_ms = (time.perf_counter() - ready) * 1e3
        first_logits = logits[0].copy()

        eos = self.manifest.dims["eos_token_id"]
        eos = set(eos) if isinstance(eos, list) else {eos}
        decoder = IncrementalDecoder(self.tokenizer)
        generated, decode_ms, finish = [], [], "length"
        while True:
            token = sampler(logits[0])
            if token in eos:
                finish = "eos"
                break
            generated.append(token)
            yield TokenEvent(len(generated) - 1, token, decoder.push(token), decode_ms[-1] if decode_ms else prefill_ms)
            if len(generated) >= max_new_tokens:
                break
            position = length + len(generated) - 1
            start = time.perf_counter()
            logits, cache = self.backend.llm.infer(
                {"inputs_embeds": self.backend.embed(np.array([[token]], np.int64)),
                 "attention_mask": np.ones((1, position + 1), np.int64),
                 "position_ids": self.family.decode_position_ids(position, rope_delta)},
                check_inputs=False, cache=cache,
            )
            decode_ms.append((time.perf_counter() - start) * 1e3)
        tail = decoder.flush()
        if tail:
            yield TokenEvent(len(generated), None, tail, 0.0)
        return GenerationResult(
            text=decoder.text, token_ids=generated, finish_reason=finish, prompt_tokens=num_text,
            image_tokens=image_tokens, vision_ms=vision_ms, prefill_ms=prefill_ms,
            decode_ms=decode_ms, first_logits=first_logits, first_token_ms=first_token_ms,
            image_tokens_stage2=image_tokens_stage2,
        )

    def answer(self, pictures, prompt: str, budget: int | None = None, budget1=None, budget2=None, **options):
        """generate() on an image build, generate_video() with the pictures as the frames of one video on a
        video build (one-stage): what checks holding pictures for any family (parity, bench) call."""
        if self.family.media == "video":
            if budget1 is not None or budget2 is not None:
                raise InvalidInputError("--budget1/--budget2 are for two-stage image builds: pass --budget with a video")
            return self.generate_video(list(pictures), prompt, budget=budget, **options)
        return self.generate(pictures, prompt, budget=budget, budget1=budget1, budget2=budget2, **options)

    # -- video: frames encoded as they arrive -------------------------------------------------------
    def generate_video(
        self, frames, prompt: str, budget: int | None = None, num_frames: int | None = None,
        max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        stream: bool = True,
    ):
        """Answer `prompt` about a video whose frames may still be arriving.

        frames: a list, or any iterable of frames (PIL images, or numpy [H, W, 3] arrays: uint8 0..255 or
        float 0..1, read by load_image exactly once, as images are), e.g.
        `iter_video_frames(path)` or a camera; each frame goes through the vision graph (stage 1 at its
        share of the budget) as soon as it arrives, so after the last frame only that frame's encoding
        and the prefill of the compressed tokens remain before the first token. budget: visual tokens
        kept for the whole video (default: the build's budget per frame), split evenly across the
        frames; num_frames is needed when `frames` has no len().
        """
        self.check_open()
        if self.manifest.dims.get("media", "image") != "video":
            raise InvalidInputError("this build encodes images, not video frames: pass --image (generate)")
        check_prompt(prompt)
        check_count("max_new_tokens", max_new_tokens)
        check_count("budget", budget, low=None, optional=True)
        check_count("num_frames", num_frames, optional=True)
        if num_frames is None:
            if not hasattr(frames, "__len__"):
                raise InvalidInputError("frames is a stream without len(): pass num_frames (--frames)")
            num_frames = len(frames)
        budgets = self.budgets.per_frame(budget, num_frames)
        ids = self.prompt_ids(prompt, 1)
        placeholder = self.manifest.dims["image_token_id"]
        if ids.count(placeholder) != 1:
            raise InvalidInputError(
                f"the prompt contains the video placeholder {self.tokenizer.video_token!r} itself: remove it "
                f"(the video is placed before the prompt)"
            )
        num_text = len(ids) - 1
        image_tokens = sum(budgets) + num_frames * self.manifest.dims.get("prefix_tokens", 0)
        self.check_context(num_text, 1, image_tokens, max_new_tokens)
        sampler = Sampler(temperature, top_p, seed)
        steps = self._video_steps(iter(frames), ids, budgets, image_tokens, max_new_tokens, sampler, num_text)
        generation = Generation(steps)
        return generation if stream else generation.run()

    def _video_steps(self, frames, ids, budgets, image_tokens, max_new_tokens, sampler, num_text) -> Iterator[TokenEvent]:
        rows, keep_index, vision_ms, ready = [], [], 0.0, time.perf_counter()
        for frame in frames:  # blocks until the next frame arrives
            ready = time.perf_counter()
            if len(rows) == len(budgets):
                raise InvalidInputError(f"more than the {len(budgets)} announced frames arrived: pass num_frames")
            frame = load_image(frame, f"frame {len(rows)}")  # uint8 0..255 or float 0..1 arrays, PIL images
            (frame_rows,), _, (frame_index,) = self.encode_images([frame], budgets[len(rows)])
            rows.append(frame_rows)  # [C+T, H]: this frame's prefix rows, then its kept tokens
            keep_index.append(frame_index)  # [T]
            vision_ms += (time.perf_counter() - ready) * 1e3
        if len(rows) != len(budgets):
            raise InvalidInputError(f"{len(rows)} frames arrived, {len(budgets)} were announced: pass num_frames")
        video = np.concatenate(rows)[None]  # [1, sum(C+T), H], frames in arrival order
        embeds = self.merge_embeddings(ids, video)
        placeholder = self.manifest.dims["image_token_id"]
        positions, rope_delta = self.family.position_ids(
            ids, placeholder, [None], [np.concatenate(keep_index)], length=embeds.shape[1]
        )
        return (yield from self._prefill_and_decode(
            embeds, positions, rope_delta, ready, vision_ms, image_tokens, num_text, max_new_tokens, sampler
        ))
