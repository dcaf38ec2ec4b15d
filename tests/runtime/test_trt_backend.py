"""The tensorrt backend's runners without a GPU: stand-in engines that follow the TensorRT execution-context
API (shapes and raw addresses by name, execute_async_v3 on a stream) and compute on the bound memory
(stand_in_tensorrt.py). This checks what our code does (profile choice, host shape tensors, ping-pong KV bindings across steps,
two-stage wiring, stream use, range checks, runtime cache), not TensorRT.

The runner tests run twice (the `device` fixture): on host memory ("cpu"), and on the backend's GPU memory
("cuda": Polygraphy's CUDA wrappers over a stand-in CUDA runtime, tests/runtime/fake_cuda.py, whose
"device" memory is host memory that every copy and binding is checked to lie inside)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apet_export.config import ApetConfig, ArtifactSpec, TensorSpec
from apet_export.errors import ArtifactError, EngineCompatibilityError, EngineInputError
from apet_export.manifest import Manifest
from apet_export.runtime.backends import trt as trt_backend
from apet_export.runtime.backends.device_memory import HostStream, device_memory
from apet_export.runtime.backends.trt import TrtBackend, TrtDecoder, TrtLlmRunner, TrtVisionRunner
from tests.runtime import fake_cuda
from tests.runtime.stand_in_tensorrt import (
    CONTEXT,
    HEAD_DIM,
    HEADS,
    VOCAB,
    DecoderEngine,
    Stage2Engine,
    VisionEngine,
    fake_tensorrt,
)

PROFILES = ["prefill", "decode", "extend"]


@pytest.fixture(params=["cpu", "cuda"])
def device(request, monkeypatch) -> str:
    """The backend's device: host memory, or GPU memory on the stand-in CUDA runtime (request.node.cuda)."""
    if request.param == "cuda":
        request.node.cuda = fake_cuda.install(monkeypatch)
    return request.param


def host(array, stream=None) -> np.ndarray:
    """A device array's contents (a copy), whichever memory it is in."""
    return array.to_host(stream or HostStream())


def decoder_spec(engine: DecoderEngine) -> ArtifactSpec:
    kv = lambda n, axis: TensorSpec(n, "float32", ("batch", HEADS, axis, HEAD_DIM))  # noqa: E731
    inputs = (TensorSpec(engine.first, "float32", ("batch", "sequence", HEAD_DIM)),
              TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
              TensorSpec("position_ids", "int64", ("batch", "sequence")),
              kv(f"past_key_{engine.layer}", "past_sequence"), kv(f"past_value_{engine.layer}", "past_sequence"))
    return ArtifactSpec("part.onnx", inputs, (TensorSpec(engine.output, "float32", ("batch", "sequence", HEAD_DIM)),))


def decoder_entry(names=PROFILES, max_sequence=CONTEXT, path="engines/sm89/llm.engine") -> dict:
    """A manifest engine entry as `apet-export engine` writes it (only the fields the backend reads)."""
    ranges = {"prefill": ((1, 1, max_sequence), (0, 0, 0)), "decode": ((1, 1, 1), (0, 8, CONTEXT - 1)),
              "extend": ((1, 4, CONTEXT - 1), (1, 8, CONTEXT - 1))}
    profiles = []
    for name in names:
        sequence, past = ranges[name]
        shapes = {"inputs_embeds": [[1, s, HEAD_DIM] for s in sequence], "hidden_states": [[1, s, HEAD_DIM] for s in sequence]}
        shapes |= {f"past_{k}_{i}": [[1, HEADS, p, HEAD_DIM] for p in past] for i in (0, 1) for k in ("key", "value")}
        profiles.append({"name": name, "shapes": shapes, "values": {}})
    return {"path": path, "profiles": profiles, "settings": {"max_context": CONTEXT}}


def decoder(tmp_path, engine, entry=None, stream=None, trt=None, device="cpu") -> TrtDecoder:
    (tmp_path / "llm.engine").write_bytes(b"llm")
    trt = trt or fake_tensorrt({b"llm": engine})
    part = TrtDecoder(trt, tmp_path / "llm.engine", decoder_spec(engine), entry or decoder_entry(), device,
                      stream or device_memory(device).stream())
    part.activate()
    return part


def step(part, cache, embeds, start, stop):
    feed = {part.input_name: embeds[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
            "position_ids": np.arange(start, stop)[None]}
    return part(feed, cache)[0]


def test_llm_runner_prefills_then_decodes_on_the_bound_cache(tmp_path, device):
    engine = DecoderEngine(0)
    part = decoder(tmp_path, engine, device=device)
    runner = TrtLlmRunner(part, decoder_spec(engine).inputs)
    runner.activate()
    cache = runner.new_cache(1)
    embeds = np.random.default_rng(0).standard_normal((1, 8, HEAD_DIM)).astype(np.float32)
    runner.infer({"inputs_embeds": embeds[:, :5], "attention_mask": np.ones((1, 5), np.int64),
                  "position_ids": np.arange(5)[None]}, check_inputs=False, cache=cache)  # prefill: empty cache
    for position in range(5, 8):  # decode: one token at a time, the cache never leaves its buffers
        logits = step(part, cache, embeds, position, position + 1)
    prefill, decode, extend = engine.contexts
    assert (prefill.profile, prefill.runs, decode.profile, decode.runs, extend.runs) == (0, 1, 1, 3, 0)
    assert cache.length == 8
    expected_keys = np.repeat(embeds[:, None], HEADS, axis=1)  # [1, Hkv, 8, Dh]: every step's keys, in order
    np.testing.assert_array_equal(host(cache.view(0, cache.current, cache.length)), expected_keys)
    np.testing.assert_array_equal(host(cache.view(1, cache.current, cache.length)), 2 * expected_keys)
    np.testing.assert_allclose(logits[0], expected_keys.sum() + np.arange(VOCAB), rtol=1e-5)
    runner.deactivate()


def test_several_tokens_onto_a_cache_use_the_extend_profile(tmp_path, device):
    """Chunked prefill / video frames arriving into the cache: 3 + 4 + 1 tokens; the 4-token step on a
    non-empty cache runs the "extend" profile and appends to the cache like any other step."""
    engine = DecoderEngine(0)
    part = decoder(tmp_path, engine, device=device)
    cache = part.new_cache(1)
    embeds = np.random.default_rng(1).standard_normal((1, 8, HEAD_DIM)).astype(np.float32)
    step(part, cache, embeds, 0, 3)
    step(part, cache, embeds, 3, 7)
    logits = step(part, cache, embeds, 7, 8)
    prefill, decode, extend = engine.contexts
    assert (prefill.runs, extend.runs, decode.runs) == (1, 1, 1) and extend.profile == 2
    assert extend.fed[0]["past_key_0"].shape == (1, HEADS, 3, HEAD_DIM)  # the 3 cached tokens were bound
    expected_keys = np.repeat(embeds[:, None], HEADS, axis=1)
    np.testing.assert_array_equal(host(cache.view(0, cache.current, 8)), expected_keys)
    np.testing.assert_allclose(logits[0], expected_keys.sum() + np.arange(VOCAB), rtol=1e-5)


def test_engines_without_the_extend_profile_say_to_rebuild(tmp_path):
    part = decoder(tmp_path, DecoderEngine(0), entry=decoder_entry(["prefill", "decode"]))
    cache = part.new_cache(1)
    embeds = np.zeros((1, 8, HEAD_DIM), np.float32)
    step(part, cache, embeds, 0, 3)
    with pytest.raises(EngineInputError, match="a step of 4 tokens on a cache of 3 needs the 'extend' profile.*rebuild"):
        step(part, cache, embeds, 3, 7)
    assert cache.length == 3  # nothing was bound or advanced


def test_shapes_outside_the_profile_are_typed_errors(tmp_path):
    """A shape outside the profile names tensor, shape and range before TensorRT sees it; a shape TensorRT
    itself refuses (set_input_shape -> False) is an error too, not an unclear failure later."""
    part = decoder(tmp_path, DecoderEngine(0), entry=decoder_entry(max_sequence=6))
    cache = part.new_cache(1)
    embeds = np.zeros((1, 8, HEAD_DIM), np.float32)
    with pytest.raises(EngineInputError, match=r"input inputs_embeds of shape \[1, 8, 4\] is outside the 'prefill' "
                                               r"profile \(min \[1, 1, 4\], max \[1, 6, 4\]\)"):
        step(part, cache, embeds, 0, 8)
    refusing = DecoderEngine(0)
    refusing.reject = {"position_ids"}
    part = decoder(tmp_path, refusing)  # position_ids has no recorded range to pre-check: TensorRT's answer counts
    with pytest.raises(EngineInputError, match=r"TensorRT rejected input position_ids of shape \[1, 2\]"):
        step(part, part.new_cache(1), embeds, 0, 2)


def test_the_kv_cache_takes_the_engine_tensor_dtype(tmp_path, device):
    """An fp32 manifest does not make the cache fp32: the engine's past_* dtype does (here fp16)."""
    part = decoder(tmp_path, DecoderEngine(0, kv_dtype=np.float16), device=device)
    cache = part.new_cache(1)
    assert cache.dtype == np.float16 and cache.memory.dtype == np.float16
    embeds = np.random.default_rng(2).standard_normal((1, 3, HEAD_DIM)).astype(np.float32)
    step(part, cache, embeds, 0, 3)
    np.testing.assert_allclose(host(cache.view(0, cache.current, 3)), np.repeat(embeds[:, None], HEADS, 1), rtol=1e-3)


class Stream(HostStream):
    """A stand-in CUDA stream with a handle of its own that counts synchronisations."""

    def __init__(self, handle):
        self.handle, self.synchronized = handle, 0

    def synchronize(self):
        self.synchronized += 1


def test_one_stream_for_enqueue_and_synchronisation(tmp_path):
    """The decoder's stream is the one every profile is selected on, every step enqueued on and waited for
    (once per step, when its logits come down)."""
    stream = Stream(11)
    engine = DecoderEngine(0)
    part = decoder(tmp_path, engine, stream=stream)
    cache = part.new_cache(1)
    embeds = np.zeros((1, 4, HEAD_DIM), np.float32)
    step(part, cache, embeds, 0, 3)
    step(part, cache, embeds, 3, 4)
    assert {c.profile_stream for c in engine.contexts} == {11}
    assert [s for c in engine.contexts for s in c.streams] == [11, 11]
    assert stream.synchronized == 2


def test_decoder_steps_reuse_their_device_buffers(tmp_path, monkeypatch):
    """On the GPU: the step's feeds and logits live in buffers that are allocated once and grow only when a
    step needs more (a prompt longer than any before), each feed copied up and the logits copied down on
    the decoder's stream; the KV cache is one allocation."""
    cuda = fake_cuda.install(monkeypatch)
    engine = DecoderEngine(0)
    part = decoder(tmp_path, engine, device="cuda")
    stream = part.stream.handle
    cache = part.new_cache(1)
    assert cuda.malloc_sizes == [2 * 2 * HEADS * CONTEXT * HEAD_DIM * 4]  # [names, 2, B*Hkv*C*Dh] float32
    embeds = np.random.default_rng(5).standard_normal((1, 8, HEAD_DIM)).astype(np.float32)
    step(part, cache, embeds, 0, 5)
    allocated = len(cuda.malloc_sizes)  # + inputs_embeds, attention_mask, position_ids, logits
    for position in range(5, 8):
        logits = step(part, cache, embeds, position, position + 1)
    # decode steps fit in the prefill's buffers but attention_mask [1, P+S], which doubles once (5 -> 10)
    assert allocated == 5 and cuda.malloc_sizes[allocated:] == [10 * 8]
    np.testing.assert_allclose(logits[0], np.repeat(embeds[:, None], HEADS, 1).sum() + np.arange(VOCAB), rtol=1e-5)
    longer = part.new_cache(1)
    step(part, longer, np.zeros((1, 12, HEAD_DIM), np.float32), 0, 12)  # a longer prompt: they grow
    # its cache, then inputs_embeds (12 rows > 2 x 5), attention_mask (12 > 10: 2 x 10), position_ids (12 > 2 x 5)
    assert cuda.malloc_sizes[allocated + 1 :] == [cuda.malloc_sizes[0], 12 * HEAD_DIM * 4, 20 * 8, 12 * 8]
    last = cuda.copies[-4:]  # that step: three feeds up, the logits down, all on the decoder's stream
    assert [c["kind"] for c in last] == [fake_cuda.HOST_TO_DEVICE] * 3 + [fake_cuda.DEVICE_TO_HOST]
    assert [c["nbytes"] for c in last] == [12 * HEAD_DIM * 4, 12 * 8, 12 * 8, VOCAB * 4]
    assert {c["stream"] for c in last} == {stream} and cuda.synchronized[-1] == stream
    context = engine.contexts[0]  # that prefill: every bound address lies inside a live allocation
    elements = {name: int(np.prod(shape)) for name, shape in context.shapes.items()}  # the inputs
    elements |= {"logits": VOCAB, "present_key_0": HEADS * 12 * HEAD_DIM, "present_value_0": HEADS * 12 * HEAD_DIM}
    assert sorted(elements) == sorted(context.addresses)
    for name, address in context.addresses.items():
        cuda.allocation_of(address, elements[name] * np.dtype(engine.tensors[name][1]).itemsize)
    assert cuda.allocation_of(context.addresses["present_key_0"], 1) == cuda.allocation_of(
        context.addresses["past_key_0"], 0) == cuda.allocation_of(context.addresses["present_value_0"], 1)  # one cache


def test_vision_runner_feeds_the_budget_as_a_host_shape_tensor(tmp_path, device, request):
    engine = VisionEngine()
    (tmp_path / "vision.engine").write_bytes(b"vision")
    inputs = (TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8)), TensorSpec("keep", "int64", ()))
    profiles = [{"name": "default", "shapes": {"pixel_values": [[1, 3, 8, 8], [1, 3, 8, 8], [4, 3, 8, 8]]},
                 "values": {"keep": [3, 5, 9]}}]
    runner = TrtVisionRunner(fake_tensorrt({b"vision": engine}), tmp_path / "vision.engine", inputs, profiles=profiles,
                             device=device)
    runner.activate()
    outputs = runner.infer({"pixel_values": np.zeros((2, 3, 8, 8), np.float32), "keep": np.array(5, np.int64)})
    assert outputs["image_embeds"].shape == (2, 5, HEAD_DIM) and outputs["keep_index"].tolist() == [list(range(5))] * 2
    assert engine.contexts[0].shapes["keep"] == ()  # a 0-d shape tensor, read from host memory
    with pytest.raises(EngineInputError, match=r"input keep = 10 is outside the 'default' profile's range \[3, 9\]"):
        runner.infer({"pixel_values": np.zeros((1, 3, 8, 8), np.float32), "keep": np.array(10, np.int64)})
    runner.deactivate()
    if device == "cuda":  # a runner without the backend's stream makes one of its own and destroys it
        cuda = request.node.cuda
        assert len(cuda.streams) == 1 and cuda.destroyed == cuda.streams
        assert {c.profile_stream for c in engine.contexts} == set(cuda.streams)


# -- the backend on a two-stage build ---------------------------------------------------------------

def two_stage_build(tmp_path: Path, module: str = "tensorrt_rtx_bindings") -> tuple[Path, Manifest, dict]:
    """A two-stage build directory (vision, llm_a = layer 0, stage2, llm_b = layer 1) with stand-in engines
    for sm89 and the manifest `apet-export engine` would write for them."""
    from safetensors.numpy import save_file

    build = tmp_path / "build"
    (build / "engines" / "sm89").mkdir(parents=True)
    engines = {"vision": VisionEngine(), "llm_a": DecoderEngine(0, last=False), "stage2": Stage2Engine(),
               "llm_b": DecoderEngine(1, first="hidden_states")}
    for name in engines:
        (build / "engines" / "sm89" / f"{name}.engine").write_bytes(name.encode())
    save_file({"embed_tokens": np.arange(10 * HEAD_DIM, dtype=np.float32).reshape(10, HEAD_DIM)},
              str(build / "embeddings.safetensors"))
    vision_inputs = (TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8)), TensorSpec("keep", "int64", ()))
    stage2_inputs = (TensorSpec("hidden_states", "float32", ("batch", "sequence", HEAD_DIM)),
                     *(TensorSpec(n, "int64", ()) for n in ("image_start", "image_length", "keep")))
    files = {
        "vision": ArtifactSpec("vision.onnx", vision_inputs, ()),
        "llm_a": decoder_spec(engines["llm_a"]), "stage2": ArtifactSpec("stage2.onnx", stage2_inputs, ()),
        "llm_b": decoder_spec(engines["llm_b"]), "embeddings": ArtifactSpec("embeddings.safetensors", (), ()),
    }
    built = {"module": module, "version": "1.7.1.116"}
    stage2_profile = [{"name": "prefill", "shapes": {}, "values": {
        "keep": [11, 16, 32], "image_length": [11, 16, 32], "image_start": [0, 1, CONTEXT - 1]}}]
    entries = [{**decoder_entry(path=f"engines/sm89/{name}.engine"), "artifact": name} for name in ("llm_a", "llm_b")]
    entries += [{"artifact": "vision", "path": "engines/sm89/vision.engine", "profiles": [], "settings": {}},
                {"artifact": "stage2", "path": "engines/sm89/stage2.engine", "profiles": stage2_profile, "settings": {}}]
    manifest = Manifest(
        source={}, family="llava", dims={"num_layers": 2, "num_kv_heads": HEADS, "head_dim": HEAD_DIM},
        method="apet", compression=ApetConfig(), budget={"default": 16, "min": 21, "max": 32}, precision="fp32",
        opset=23, files=files, stage2={"layer": 1},
        engines={"files": [{**e, "target": "sm89", "tensorrt": built, "precision": "fp32"} for e in entries]},
    )
    return build, manifest, engines


def test_backend_runs_two_stage_builds_with_a_cache_per_part(tmp_path, monkeypatch, device, request):
    """llm_a -> stage2 -> llm_b engines with one KV cache each: prefill compresses the image span, part B sees
    the shorter sequence at contiguous positions, decode steps go through both parts. On the GPU the target
    comes from the (stand-in) CUDA runtime, and the backend's one stream is every engine's."""
    build, manifest, engines = two_stage_build(tmp_path)
    trt = fake_tensorrt({name.encode(): engine for name, engine in engines.items()}, name="tensorrt_rtx_bindings",
                        version="1.7.1.116")
    imported = []
    monkeypatch.setattr("apet_export.compat.import_tensorrt", lambda prefer=None: imported.append(prefer) or trt)
    if device == "cpu":
        monkeypatch.setattr(trt_backend, "current_target", lambda: "sm89")
    backend = TrtBackend(build, manifest, device=device).activate()
    assert imported == ["tensorrt_rtx_bindings"]  # the module the manifest records, not `tensorrt` first
    assert backend.llm.name == "tensorrt:llm_a+stage2+llm_b"

    embeds = np.random.default_rng(3).standard_normal((1, 30, HEAD_DIM)).astype(np.float32)  # [1, L1, H]
    start, span, keep2 = 4, 20, 11  # one image of 20 rows at 4..23, stage 2 keeps 11 (M + 1, the lowest budget)
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, 30), np.int64), "position_ids": np.arange(30)[None]}
    logits, cache = backend.llm.infer(feed, check_inputs=False, cache=backend.new_cache(1),
                                      image_spans=[(start, span)], keep2=keep2)
    hidden = 2 * embeds
    compressed = np.concatenate([hidden[:, :start], hidden[:, start : start + keep2], hidden[:, start + span :]], 1)
    np.testing.assert_allclose(logits[0], HEADS * compressed.sum() + np.arange(VOCAB), rtol=1e-5)
    assert (cache.first.length, cache.second.length, cache.shift) == (30, 21, 9)
    stage2_fed = engines["stage2"].contexts[0].fed[0]
    assert [int(stage2_fed[n]) for n in ("image_start", "image_length", "keep")] == [4, 20, 11]
    second_prefill = engines["llm_b"].contexts[0].fed[0]
    assert second_prefill["position_ids"].tolist() == [list(range(21))]  # contiguous after the cut
    assert second_prefill["attention_mask"].shape == (1, 21)

    token = np.random.default_rng(4).standard_normal((1, 1, HEAD_DIM)).astype(np.float32)
    decode = {"inputs_embeds": token, "attention_mask": np.ones((1, 31), np.int64), "position_ids": np.array([[30]])}
    logits, cache = backend.llm.infer(decode, check_inputs=False, cache=cache)
    np.testing.assert_allclose(logits[0], HEADS * (compressed.sum() + 2 * token.sum()) + np.arange(VOCAB), rtol=1e-5)
    second_decode = engines["llm_b"].contexts[1].fed[0]  # part B's decode profile
    assert second_decode["position_ids"].tolist() == [[21]] and second_decode["attention_mask"].shape == (1, 22)
    assert (cache.first.length, cache.second.length) == (31, 22)
    keys_a = host(cache.first.view(0, cache.first.current, 31), backend.stream)
    np.testing.assert_array_equal(keys_a, np.repeat(np.concatenate([embeds, token], 1)[:, None], HEADS, 1))
    parts = backend.llm.parts
    backend.deactivate()
    assert all(part.engine is None for part in parts)  # the part engines and their contexts are released
    if device == "cuda":
        cuda = request.node.cuda
        assert len(cuda.streams) == 1 and cuda.destroyed == cuda.streams  # one stream, freed at deactivation
        used = {s for engine in engines.values() for c in engine.contexts for s in (c.profile_stream, *c.streams)}
        assert used == set(cuda.streams)
        assert {c["stream"] for c in cuda.copies} == set(cuda.streams)


def test_stage2_keep_below_the_profile_is_a_typed_error(tmp_path, monkeypatch):
    build, manifest, engines = two_stage_build(tmp_path)
    trt = fake_tensorrt({name.encode(): engine for name, engine in engines.items()}, name="tensorrt_rtx_bindings",
                        version="1.7.1.116")
    monkeypatch.setattr("apet_export.compat.import_tensorrt", lambda prefer=None: trt)
    monkeypatch.setattr(trt_backend, "current_target", lambda: "sm89")
    with TrtBackend(build, manifest, device="cpu") as backend:
        feed = {"inputs_embeds": np.zeros((1, 30, HEAD_DIM), np.float32), "attention_mask": np.ones((1, 30), np.int64),
                "position_ids": np.arange(30)[None]}
        with pytest.raises(EngineInputError, match=r"stage2.engine: input keep = 10 is outside .*\[11, 32\]"):
            backend.llm.infer(feed, check_inputs=False, cache=backend.new_cache(1), image_spans=[(4, 20)], keep2=10)


def test_backend_keeps_the_tensorrt_rtx_runtime_cache_per_target(tmp_path, monkeypatch):
    """TensorRT-RTX: one runtime cache attached to every execution context, read from and written back to
    engines/<target>/runtime.cache; full TensorRT has none."""
    build, manifest, engines = two_stage_build(tmp_path)
    path = build / "engines" / "sm89" / "runtime.cache"
    path.write_bytes(b"earlier")
    trt = fake_tensorrt({name.encode(): engine for name, engine in engines.items()}, name="tensorrt_rtx_bindings",
                        version="1.7.1.116")
    monkeypatch.setattr("apet_export.compat.import_tensorrt", lambda prefer=None: trt)
    monkeypatch.setattr(trt_backend, "current_target", lambda: "sm89")
    with TrtBackend(build, manifest, device="cpu") as backend:
        configs = [c.config for engine in engines.values() for c in engine.contexts]
        caches = {id(c.cache) for c in configs}
        assert len(configs) == 1 + 3 + 1 + 3 and len(caches) == 1  # vision, llm_a x3, stage2, llm_b x3: one cache
        assert backend.runtime_cache.loaded and configs[0].cache.blob == b"earlier"
    assert path.read_bytes() == b"earlier+kernels"  # saved at deactivation (atomically, no temporary left)
    assert sorted(p.name for p in path.parent.iterdir()) == ["llm_a.engine", "llm_b.engine", "runtime.cache",
                                                              "stage2.engine", "vision.engine"]
    full = fake_tensorrt({name.encode(): engine for name, engine in engines.items()}, version="10.15")
    for entry in manifest.engines["files"]:
        entry["tensorrt"] = {"module": "tensorrt", "version": "10.15"}
    monkeypatch.setattr("apet_export.compat.import_tensorrt", lambda prefer=None: full)
    with TrtBackend(build, manifest, device="cpu"):
        assert all(c.config is None for engine in engines.values() for c in engine.contexts[-1:])


def test_backend_names_the_missing_part_engines(tmp_path, monkeypatch):
    build, manifest, engines = two_stage_build(tmp_path)
    manifest.engines["files"] = [e for e in manifest.engines["files"] if e["artifact"] != "stage2"]
    trt = fake_tensorrt({name.encode(): engine for name, engine in engines.items()}, name="tensorrt_rtx_bindings",
                        version="1.7.1.116")
    monkeypatch.setattr("apet_export.compat.import_tensorrt", lambda prefer=None: trt)
    monkeypatch.setattr(trt_backend, "current_target", lambda: "sm89")
    with pytest.raises(ArtifactError, match=r"has no stage2 engine\(s\) for sm89 \(it has llm_a, llm_b, vision\): "
                                            r"build them with `apet-export engine .* --target current --artifact stage2`"):
        TrtBackend(build, manifest, device="cpu").activate()
    manifest.engines["files"][0]["tensorrt"] = {"module": "tensorrt", "version": "10.15"}
    with pytest.raises(EngineCompatibilityError, match="built by different TensorRT modules"):
        TrtBackend(build, manifest, device="cpu").activate()
