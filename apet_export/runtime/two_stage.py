"""Two-stage LLM runner: layers [0, K) → ApET stage 2 on each image span → layers [K, L), each part
with its own KV cache and positions. One class drives both backends through small part objects.

    prefill  (image_spans, keep2 given):
        part A(inputs_embeds [B, L1, H], mask [B, L1], positions 0..L1-1)        -> hidden [B, L1, H]
        stage 2, last span first (earlier starts stay valid)                      -> hidden [B, L2, H]
        part B(hidden, mask without the dropped columns, positions 0..L2-1)      -> logits [B, V]
    decode step j (the pipeline feeds position L1 + j and a mask of L1 + j + 1 ones):
        part A(embeds [B, 1, H], that mask, position L1 + j)                      -> hidden [B, 1, H]
        part B(hidden, the mask minus the L1 - L2 dropped columns, position L2 + j) -> logits

The pipeline keeps feeding what it feeds a one-graph build (positions and masks of the uncompressed
sequence); the shift for part B is recorded in the StagedCache at prefill. Stage 2 with keep2 equal to
the span length is the identity and is skipped (a one-stage request on a two-stage build).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from polygraphy.backend.base import BaseRunner

from apet_export.manifest import Manifest


@dataclass
class StagedCache:
    first: object  # the KV cache of layers [0, K), in the part's own form
    second: object  # the KV cache of layers [K, L)
    dropped: list[int] = field(default_factory=list)  # columns of the L1 sequence that part B never saw

    @property
    def shift(self) -> int:
        return len(self.dropped)


def image_spans(ids: list[int], image_token_id: int, tokens_per_image: int) -> list[tuple[int, int]]:
    """(start, length) of every image's rows in the merged sequence: each placeholder in `ids` becomes
    `tokens_per_image` rows (Pipeline.merge_embeddings)."""
    return [(start, length) for start, length, _ in stage2_spans(
        ids, image_token_id, [tokens_per_image] * ids.count(image_token_id), [(tokens_per_image, 0)] * ids.count(image_token_id)
    )]


def stage2_spans(ids: list[int], image_token_id: int, image_rows: list[int], cuts: list[tuple[int, int]]):
    """(start, length, keep) of what stage 2 compresses in every image: placeholder i in `ids` becomes
    image_rows[i] rows (Pipeline.merge_embeddings), of which the first cuts[i] = (length, keep) rows are cut
    to `keep` (all of them for LLaVA; the base crop's for LLaVA-NeXT)."""
    spans, offset, image = [], 0, 0
    for position, token in enumerate(ids):
        if token == image_token_id:
            spans.append((position + offset, *cuts[image]))
            offset += image_rows[image] - 1
            image += 1
    return spans


class TwoStageLlmRunner(BaseRunner):
    """infer(feed, cache=StagedCache, image_spans=None, keep2=None) -> (logits [B, V] f32, cache), the
    interface of the one-graph LLM runners plus the stage-2 request at prefill: image_spans holds (start,
    length) with one keep2 for all, or (start, length, keep) per span (LLaVA-NeXT: each image's base crop).

    `first(feed, cache) -> (hidden, cache)`, `second(feed, cache) -> (logits, cache)` and
    `stage2(hidden, start, length, keep) -> hidden` are the backend's parts (onnxruntime or eager torch).
    """

    def __init__(self, first, stage2, second, new_part_caches, name: str):
        super().__init__(name=name, prefix="two-stage-llm-runner")
        self.first, self.stage2, self.second, self.new_part_caches = first, stage2, second, new_part_caches

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        metadata = TensorMetadata()
        for name, dtype in (("inputs_embeds", np.float32), ("attention_mask", np.int64), ("position_ids", np.int64)):
            metadata.add(name, dtype, None)
        return metadata

    def new_cache(self, batch: int) -> StagedCache:
        return StagedCache(*self.new_part_caches(batch))

    def infer_impl(self, feed_dict, cache: StagedCache = None, image_spans=None, keep2: int | None = None):
        start_time = time.perf_counter()
        hidden, first_cache = self.first(feed_dict, cache.first)  # [B, S, H]
        mask, positions = feed_dict["attention_mask"], feed_dict["position_ids"]  # [B, P1+S], [B, S]
        dropped = list(cache.dropped)
        if image_spans is not None:  # prefill: compress each image span, then contiguous positions
            for span in sorted(image_spans, reverse=True):  # (start, length), keep2; or (start, length, keep)
                start, length, keep = span if len(span) == 3 else (*span, keep2)
                if keep is not None and keep < length:
                    hidden = self.stage2(hidden, start, length, keep)
                    dropped += range(start + keep, start + length)  # all image rows are real tokens
            positions = positions[:, :1] + np.arange(hidden.shape[1], dtype=np.int64)[None]  # [B, L2]
        else:
            positions = positions - len(dropped)  # decode: L1 + j -> L2 + j
        second_feed = {"hidden_states": hidden, "attention_mask": np.delete(mask, dropped, axis=1), "position_ids": positions}
        logits, second_cache = self.second(second_feed, cache.second)
        self.inference_time = time.perf_counter() - start_time
        return logits, StagedCache(first_cache, second_cache, sorted(dropped))


# -- onnxruntime parts ------------------------------------------------------------------------------

class OnnxrtPart:
    """One part graph (llm_a / llm_b) with its past_* inputs fed from a dict named as in the manifest."""

    def __init__(self, build_dir, manifest: Manifest, name: str):
        from apet_export.runtime.sessions import onnxruntime_session

        spec = manifest.files[name]
        self.session = onnxruntime_session(manifest.file(build_dir, name))
        self.past = [t for t in spec.inputs if t.name.startswith("past_")]
        self.output_names = [t.name for t in spec.outputs]
        self.dtype = np.dtype(spec.inputs[0].dtype)
        self.input_name = spec.inputs[0].name

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {t.name: np.zeros((batch, t.shape[1], 0, t.shape[3]), self.dtype) for t in self.past}

    def __call__(self, feed: dict, cache: dict):
        first = self.input_name  # inputs_embeds or hidden_states
        feed = {**feed, first: feed[first].astype(self.dtype, copy=False), **cache}
        outputs = self.session.run(self.output_names, feed)
        presents = {t.name: value for t, value in zip(self.past, outputs[1:], strict=True)}  # same order
        return outputs[0], presents


def onnxrt_two_stage_runner(build_dir, manifest: Manifest) -> TwoStageLlmRunner:
    from apet_export.runtime.sessions import onnxruntime_session

    first, second = OnnxrtPart(build_dir, manifest, "llm_a"), OnnxrtPart(build_dir, manifest, "llm_b")
    session = onnxruntime_session(manifest.file(build_dir, "stage2"), spin=False)  # once per image

    def stage2(hidden, start, length, keep):
        feed = {"hidden_states": hidden, "image_start": np.array(start, np.int64),
                "image_length": np.array(length, np.int64), "keep": np.array(keep, np.int64)}
        return session.run(["compressed_states"], feed)[0]

    def second_logits(feed, cache):
        logits, presents = second(feed, cache)
        return logits.astype(np.float32), presents

    return TwoStageLlmRunner(
        first, stage2, second_logits, lambda batch: (first.empty_cache(batch), second.empty_cache(batch)),
        name="onnxruntime:llm_a+stage2+llm_b",
    )


# -- eager torch parts (the reference) --------------------------------------------------------------

def eager_stage2(hidden: np.ndarray, start: int, length: int, keep: int, config) -> dict[str, np.ndarray]:
    """stage2.onnx's outputs computed with the library's public apet_compress on the span, spliced back:
    a path independent of the traced Stage2Graph, as eager_vision is for vision.onnx."""
    import torch

    from apet_export.compression import apet_compress

    states = torch.from_numpy(hidden)  # [B, L1, H]
    with torch.inference_mode():
        out = apet_compress(states[:, start : start + length], keep, config, stage=2)
        compressed = torch.cat([states[:, :start], out.tokens, states[:, start + length :]], dim=1)  # [B, L2, H]
    return {"compressed_states": compressed.numpy(), "keep_index": out.index.numpy(), "scores": out.scores.numpy()}


class TorchPart:
    """Hugging Face decoder layers [first, last) called one by one with the model's own rotary embedding
    and causal mask; the last part ends with the final norm and the head."""

    def __init__(self, language_model, lm_head, layers: range):
        self.language_model, self.lm_head, self.layers = language_model, lm_head, layers
        self.with_head = layers.stop == len(language_model.layers)
        self.input_name = "inputs_embeds" if layers.start == 0 else "hidden_states"  # as the part graphs

    def __call__(self, feed: dict, cache):
        import torch
        from transformers.masking_utils import create_causal_mask

        lm = self.language_model
        with torch.inference_mode():
            hidden = torch.from_numpy(feed[self.input_name]).to(lm.dtype)  # [B, S, H]
            position_ids = torch.from_numpy(feed["position_ids"])  # [B, S]
            mask = create_causal_mask(
                config=lm.config, inputs_embeds=hidden, attention_mask=torch.from_numpy(feed["attention_mask"]),
                past_key_values=cache, position_ids=position_ids, layer_idx=self.layers.start,
            )  # sized against this part's own cache layers
            position_embeddings = lm.rotary_emb(hidden, position_ids)  # (cos, sin) [B, S, Dh]
            for i in self.layers:
                hidden = lm.layers[i](
                    hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True,
                    position_embeddings=position_embeddings,
                )
            if self.with_head:
                return self.lm_head(lm.norm(hidden[:, -1])).float().numpy(), cache  # [B, V]
            return hidden.float().numpy(), cache  # [B, S, H]


def torch_two_stage_runner(model, family, manifest: Manifest) -> TwoStageLlmRunner:
    from transformers import DynamicCache

    language_model, lm_head = family.language_model(model), family.lm_head(model)
    layer = manifest.stage2["layer"]
    first = TorchPart(language_model, lm_head, range(0, layer))
    second = TorchPart(language_model, lm_head, range(layer, len(language_model.layers)))

    def stage2(hidden, start, length, keep):
        return eager_stage2(hidden, start, length, keep, manifest.compression)["compressed_states"]

    def new_caches(batch):  # one cache per part; each part only touches its own (global) layer indices
        config = language_model.config
        return DynamicCache(config=config), DynamicCache(config=config)

    return TwoStageLlmRunner(first, stage2, second, new_caches, name="torch:layers[0,K)+apet+layers[K,L)")
