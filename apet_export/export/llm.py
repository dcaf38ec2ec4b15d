"""torch -> ONNX for decoder layers [a, b): one fused attention op per layer and explicit KV-cache I/O.

The whole model is [0, L) (llm.onnx); a two-stage build writes [0, K) (llm_a.onnx) and [K, L) (llm_b.onnx)
with the same exporter. One graph serves prefill (S = prompt length, P = 0) and decode (S = 1, P = so far):

    inputs_embeds [B, S, H]   (a = 0: the runtime embeds the text and splices the image rows in)
      or hidden_states [B, S, H]   (a > 0: the previous part's output)
    attention_mask [B, P+S] int64 (1 = real token, 0 = left padding)
    position_ids [B, S] int64  ([3, B, S] for M-RoPE families: the manifest records which)
    past_key_i / past_value_i [B, Hkv, P, Dh]            for each layer i in [a, b) (global index)
      │
      ▼  per layer: RMSNorm → q/k/v proj → RoPE → concat past → SDPA (→ ONNX Attention) → o_proj → MLP
         (the last layer, b = L: attention, o_proj and MLP for the last position only)
    logits [B, V]  (b = L: final norm and head, last position)   or hidden_states [B, S, H] (b < L)
    present_key_i / present_value_i [B, Hkv, P+S, Dh]

The decoder below reads the weights of the Hugging Face layers and reuses their RoPE helpers, so it is
the same computation as the eager model; parity checks hold it to that.

Why the standard opset-23 `Attention` rather than onnxruntime's com.microsoft.GroupQueryAttention
(measured on onnxruntime 1.31 CPU, 2 threads, Qwen2-0.5B attention shapes, Hq=14 Hkv=2 Dh=64):
both match a float64 reference to ~1e-6; prefill (S=600) is within 2-20% (GQA slightly ahead), decode
through 24 layers (P=600) is ~20% faster with Attention. TensorRT's ONNX parser imports `Attention`
from 10.14 (IAttention) but only with one output and no past_key/past_value inputs, which is why the
KV concat stays outside the node here; RMSNormalization / RotaryEmbedding need TensorRT >= 10.15.
GroupQueryAttention has no TensorRT importer (it would need a plugin). The CPU form of this graph
(export/cpu_graph.py, export/cpu_fusions.py) does use GroupQueryAttention: there one node also replaces the
cache write, the transposes to heads and back and the mask's padding to the buffer, and whole decode steps
measured at parity with onnxruntime-genai's where Attention's block was 0.86-0.88 (scripts/bench_vs_genai.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apet_export.compat import quiet_export
from apet_export.config import ArtifactSpec, TensorSpec, masked_value
from apet_export.errors import ExportError
from apet_export.export.onnx_graph import finish_and_save


def causal_padding_mask(attention_mask: torch.Tensor, query_length: int, dtype) -> torch.Tensor:
    """attention_mask [B, T] (T = P + S) -> additive mask [B, 1, S, T]: query i (absolute position P + i)
    sees key j if j <= P + i and key j is not padding."""
    total = attention_mask.shape[1]
    query_position = torch.arange(query_length, device=attention_mask.device) + (total - query_length)  # [S]
    key_position = torch.arange(total, device=attention_mask.device)  # [T]
    visible = (key_position[None, :] <= query_position[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(visible, 0.0, masked_value(dtype == torch.float16)).to(dtype)


class DecoderGraph(nn.Module):
    """The traced module of decoder layers [a, b) (`layers`, default all). `language_model` is the HF
    LlamaModel / Qwen2Model (/ Qwen2.5-VL text model), `lm_head` its head. `past` holds the KV of these
    layers only."""

    def __init__(self, language_model, lm_head, layers: range | None = None):
        super().__init__()
        self.language_model, self.lm_head = language_model, lm_head
        self.layer_range = range(len(language_model.layers)) if layers is None else layers
        self.with_head = self.layer_range.stop == len(language_model.layers)
        config = language_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def rotate(self, x, cos, sin):
        """RoPE of x [B, H, S, Dh] as one ONNX RotaryEmbedding node (cos, sin [B, S, Dh] -> their first halves).

        The same numbers as the Hugging Face apply_rotary_pos_emb of Llama, Qwen2 and Qwen2.5-VL (x·cos +
        rotate_half(x)·sin, bit for bit): their cos and sin are cat(freqs, freqs), M-RoPE's too (its sections
        are doubled), so the halves are equal. Exported as the op for every family, where the exporter's own
        rewrite found Llama's and Qwen2's form but left Qwen2.5-VL's as Slice/Neg/Concat/Mul/Add: TensorRT
        imports the op, and onnxruntime's GroupQueryAttention form reads it (export/cpu_fusions.py)."""
        half = self.head_dim // 2
        return torch.onnx.ops.rotary_embedding(x, cos[..., :half], sin[..., :half], num_heads=x.shape[1])

    def attention(self, layer, hidden, cos, sin, mask, past_key, past_value, last_query_only: bool = False):
        """hidden [B, S, H] -> (output [B, S', H], present_key, present_value [B, Hkv, P+S, Dh]); S' = S, or 1
        with last_query_only (the attention of the last position only: the keys and values are still every
        position's, for the cache)."""
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, S, Dh]
        k = attn.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        v = attn.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        k = torch.cat([past_key, k], dim=2)  # [B, Hkv, P+S, Dh]
        v = torch.cat([past_value, v], dim=2)
        if last_query_only:
            q, mask = q[:, :, -1:], mask[:, :, -1:]  # [B, Hq, 1, Dh], [B, 1, 1, P+S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        out = out.transpose(1, 2).reshape(batch, q.shape[2], self.num_heads * self.head_dim)
        return attn.o_proj(out), k, v

    def forward(self, states, attention_mask, position_ids, *past):
        lm = self.language_model
        hidden = states  # [B, S, H]: inputs_embeds (first layer 0) or the previous part's hidden_states
        cos, sin = lm.rotary_emb(hidden, position_ids)  # [B, S, Dh] (M-RoPE: position_ids [3, B, S])
        mask = causal_padding_mask(attention_mask, hidden.shape[1], hidden.dtype)  # [B, 1, S, P+S]
        presents = []
        for slot, i in enumerate(self.layer_range):
            layer = lm.layers[i]
            # The head reads the last position only, so after the last layer's keys and values (the cache needs
            # every position's) nothing else of the other positions is used: that layer's attention, o_proj and
            # MLP run for the last position alone (a prompt's prefill: 1/L of the layers' weight products less).
            last_query_only = self.with_head and i == self.layer_range.stop - 1
            attended, key, value = self.attention(
                layer, layer.input_layernorm(hidden), cos, sin, mask, past[2 * slot], past[2 * slot + 1],
                last_query_only,
            )
            if last_query_only:
                hidden = hidden[:, -1:]  # [B, 1, H]
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += [key, value]
        if self.with_head:
            return (self.lm_head(lm.norm(hidden[:, -1])), *presents)  # logits [B, V], last position only
        return (hidden, *presents)  # hidden_states [B, S, H]


def llm_io(layers: range, num_layers: int, hidden: int, num_kv_heads: int, head_dim: int, vocab: int, dtype: str,
           position_shape: tuple = ("batch", "sequence")):
    """(inputs, outputs) of decoder layers [a, b) of num_layers, KV named with global layer indices.
    position_shape: ("batch", "sequence"), or (3, "batch", "sequence") for M-RoPE (t, h, w per token)."""
    kv = lambda name, length: TensorSpec(name, dtype, ("batch", num_kv_heads, length, head_dim))  # noqa: E731
    inputs = [
        TensorSpec("inputs_embeds" if layers.start == 0 else "hidden_states", dtype, ("batch", "sequence", hidden)),
        TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
        TensorSpec("position_ids", "int64", tuple(position_shape)),
    ]
    if layers.stop == num_layers:
        outputs = [TensorSpec("logits", dtype, ("batch", vocab))]
    else:
        outputs = [TensorSpec("hidden_states", dtype, ("batch", "sequence", hidden))]
    for i in layers:
        inputs += [kv(f"past_key_{i}", "past_sequence"), kv(f"past_value_{i}", "past_sequence")]
        outputs += [kv(f"present_key_{i}", "total_sequence"), kv(f"present_value_{i}", "total_sequence")]
    return inputs, outputs


def export_llm(graph: DecoderGraph, path: Path, inputs, outputs, dtype: torch.dtype, opset: int = 23) -> None:
    """Trace `graph` (its layer range) to `path`; node names start with /<file stem>/ (/llm/, /llm_a/...)."""
    config = graph.language_model.config
    batch, length, past_length = 2, 5, 3  # examples > 1 so no axis is specialised to a constant
    embeds = torch.randn(batch, length, config.hidden_size, dtype=dtype)
    attention_mask = torch.ones(batch, past_length + length, dtype=torch.long)
    position_ids = torch.arange(past_length, past_length + length).expand(batch, -1)  # [B, S]
    rank = len(next(t for t in inputs if t.name == "position_ids").shape)
    if rank == 3:  # M-RoPE: [3, B, S], the rotary embedding mixes the three rows by frequency section
        position_ids = torch.stack([position_ids, position_ids + 1, position_ids + 2])
    past = [torch.randn(batch, graph.num_kv_heads, past_length, graph.head_dim, dtype=dtype) for _ in range(2 * len(graph.layer_range))]
    b, s, p = torch.export.Dim("batch", max=1024), torch.export.Dim("sequence", max=65536), torch.export.Dim("past_sequence", max=65536)
    dynamic = {
        "states": {0: b, 1: s},
        "attention_mask": {0: b, 1: torch.export.Dim.AUTO},  # = past_sequence + sequence, inferred
        "position_ids": {0: b, 1: s} if rank == 2 else {1: b, 2: s},
        "past": tuple({0: b, 2: p} for _ in past),
    }
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(
                graph, (embeds, attention_mask, position_ids, *past), dynamo=True, opset_version=opset,
                input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                dynamic_shapes=dynamic,
            )
    except Exception as error:
        first, last = graph.layer_range.start, graph.layer_range.stop
        raise ExportError(f"exporting decoder layers [{first}, {last}) to {path.name} failed: {error}") from error
    finish_and_save(program.model_proto, path, f"/{path.stem}", inputs, outputs)


def export_decoder_range(model, family, layers: range, out_dir: Path, name: str, manifest, precision: str) -> None:
    """Write decoder layers [a, b) of the family's text model to out_dir/<name>.onnx and record it in the
    manifest under `name` (llm = [0, L); llm_a / llm_b = the parts of a two-stage build)."""
    language_model, lm_head = family.language_model(model), family.lm_head(model)
    config = language_model.config
    dtype = torch.float16 if precision == "fp16" else torch.float32
    graph = DecoderGraph(language_model, lm_head, layers).eval().to(dtype)
    inputs, outputs = llm_io(
        layers, len(language_model.layers), config.hidden_size, graph.num_kv_heads, graph.head_dim,
        config.vocab_size, "float16" if precision == "fp16" else "float32", family.llm_position_shape,
    )
    try:
        export_llm(graph, out_dir / f"{name}.onnx", inputs, outputs, dtype, opset=manifest.opset)
    finally:
        graph.to(torch.float32)  # the model object is shared with the caller
    manifest.files[name] = ArtifactSpec(f"{name}.onnx", tuple(inputs), tuple(outputs))


def export_llm_artifacts(model, family, out_dir: Path, manifest, precision: str, write_graph: bool = True) -> None:
    """Write llm.onnx (decoder layers [0, L)) and record it, the embedding table and the LLM dims in the
    manifest. write_graph=False: only the table and the dims (a two-stage build writes its parts)."""
    language_model = family.language_model(model)
    config = language_model.config
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if write_graph:
        export_decoder_range(model, family, range(len(language_model.layers)), out_dir, "llm", manifest, precision)
    graph = DecoderGraph(language_model, family.lm_head(model))  # its head counts, as the graphs use them

    # The runtime embeds token ids itself (then splices image rows in): ship the table beside the graph.
    from safetensors.torch import save_file

    table = language_model.embed_tokens.weight.detach().to(dtype).contiguous()  # [V, H]
    save_file({"embed_tokens": table}, str(out_dir / "embeddings.safetensors"))
    spec = TensorSpec("embed_tokens", "float16" if precision == "fp16" else "float32", (config.vocab_size, config.hidden_size))
    manifest.files["embeddings"] = ArtifactSpec("embeddings.safetensors", (), (spec,))
    manifest.dims.update(
        num_layers=len(language_model.layers), num_heads=graph.num_heads, num_kv_heads=graph.num_kv_heads,
        head_dim=graph.head_dim, vocab_size=config.vocab_size, max_context=config.max_position_embeddings,
        image_token_id=family.image_token_id(model), eos_token_id=config.eos_token_id,
    )
