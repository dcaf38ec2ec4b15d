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
from PIL import Image

from apet_export.errors import InvalidInputError, PromptTooLongError, UnknownNameError
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

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_ms) / (sum(self.decode_ms) / 1e3) if self.decode_ms else 0.0

    def summary(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
            **({"image_tokens_stage2": self.image_tokens_stage2} if self.image_tokens_stage2 is not None else {}),
            "generated_tokens": len(self.token_ids), "vision_ms": round(self.vision_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
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


class Pipeline:
    def __init__(self, build_dir: Path, manifest: Manifest, backend, processor):
        from apet_export.models.registry import get_family

        self.build_dir, self.manifest, self.backend, self.processor = build_dir, manifest, backend, processor
        self.tokenizer = processor.tokenizer
        self.family = get_family(manifest.family)  # vision feeds and LLM positions differ by family

    @classmethod
    def from_dir(cls, build_dir: str | Path, backend: str = "onnxruntime", vision_graph: str = "vision") -> Pipeline:
        from apet_export.models.registry import get_family

        build_dir = Path(build_dir)
        manifest = load_manifest(build_dir)
        if backend == "onnxruntime":
            from apet_export.runtime.backends.onnxrt import OnnxrtBackend

            runner = OnnxrtBackend(build_dir, manifest, vision_graph=vision_graph)
        elif backend == "torch":
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
        processor = get_family(manifest.family).load_processor(manifest.model_dir(build_dir))
        try:
            runner.activate()
        except BaseException:
            runner.deactivate()  # release whatever runner did start
            raise
        return cls(build_dir, manifest, runner, processor)

    def close(self) -> None:
        self.backend.deactivate()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompt -------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        """Token ids of the prompt with one image placeholder per image, through the chat template."""
        image_token = self.tokenizer.image_token
        if self.tokenizer.chat_template:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False).input_ids  # the template wrote BOS
        return self.tokenizer(f"{image_token}\n" * num_images + prompt).input_ids

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
        budget1: int | None = None, budget2: int | None = None,
    ):
        """Generation (iterable of text deltas) if stream, else the GenerationResult. images: one image or a
        list, each a path or a PIL image. On a two-stage build `budget` is the average of the stages (96/32
        for 64) unless budget1/budget2 are given (stages.py)."""
        from apet_export.compression.stages import resolve_budgets

        if isinstance(images, str | Path | Image.Image):  # one image
            images = [images]
        images = [load_image(i) for i in images]  # paths or PIL images -> checked RGB images
        if not images:
            raise InvalidInputError("at least one image is needed: pass --image")
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # budget None: the family's share of each image's tokens; budget2 None: one stage
        budget, budget2 = resolve_budgets(self.manifest, budget, budget1, budget2)
        ids = self.prompt_ids(prompt, len(images))
        image_token_id = self.manifest.dims["image_token_id"]
        if ids.count(image_token_id) != len(images):
            raise InvalidInputError(
                f"the prompt contains the image placeholder {self.tokenizer.image_token!r} itself: remove it "
                f"(each image given is placed before the prompt)"
            )
        num_text = sum(1 for t in ids if t != image_token_id)
        self.check_context(num_text, len(images), budget or self.manifest.budget["max"], max_new_tokens)
        sampler = Sampler(temperature, top_p, seed)
        generation = Generation(self._steps(images, ids, budget, max_new_tokens, sampler, num_text, budget2))
        return generation if stream else generation.run()

    def _steps(self, images, ids, budget, max_new_tokens, sampler, num_text, budget2=None) -> Iterator[TokenEvent]:
        start = time.perf_counter()
        image_token_id = self.manifest.dims["image_token_id"]
        feeds, layouts = self.family.vision_feeds(self.processor, images, budget, self.manifest)
        image_embeds, keep_index = [], []  # per image: [T_i, H], [T_i]
        for feed in feeds:  # one batched feed (LLaVA) or one per image (dynamic resolution)
            vision = self.backend.vision.infer(feed, check_inputs=False)
            image_embeds += list(vision["image_embeds"])
            keep_index += list(vision["keep_index"])
        embeds = self.merge_embeddings(ids, image_embeds)  # [1, L, H]
        positions, rope_delta = self.family.position_ids(ids, image_token_id, layouts, keep_index)  # [(3,) 1, L]
        vision_ms = (time.perf_counter() - start) * 1e3

        length = embeds.shape[1]
        stage2 = {}  # two-stage builds: where the image rows are, and how many stage 2 keeps of each
        if budget2 is not None:
            from apet_export.runtime.two_stage import image_spans

            stage2 = {"image_spans": image_spans(ids, self.manifest.dims["image_token_id"], budget), "keep2": budget2}
        start = time.perf_counter()
        logits, cache = self.backend.llm.infer(
            {"inputs_embeds": embeds, "attention_mask": np.ones((1, length), np.int64), "position_ids": positions},
            check_inputs=False, cache=self.backend.new_cache(1), **stage2,
        )
        prefill_ms = (time.perf_counter() - start) * 1e3
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
            image_tokens=sum(len(k) for k in keep_index), vision_ms=vision_ms, prefill_ms=prefill_ms,
            decode_ms=decode_ms, first_logits=first_logits,
            image_tokens_stage2=None if budget2 is None else len(images) * budget2,
        )
