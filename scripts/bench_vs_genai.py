"""apet-export's LLM decoder against onnxruntime-genai on the same weights: decode tok/s, prefill time, peak RSS
and greedy agreement, measured side by side in one run.

    pip install -e ".[bench]" -c constraints.txt       # onnxruntime-genai, pinned
    python scripts/bench_vs_genai.py [--build DIR] [--work DIR] [--precision fp32 --precision int4] [--requests 3]
    python scripts/bench_vs_genai.py --quick            # smoke run on a tiny Qwen2 preset (minutes)
    python scripts/bench_vs_genai.py --preset bench-llava-clip-l-qwen2-0.5b-vocab --genai-prune-lm-head
                                                        # Qwen2's real vocabulary; the peer's prompt logits pruned

What it does:
  1. builds the `bench-llava-clip-l-qwen2-0.5b` preset (or --preset) with `apet-export build` if --build has no
     build. That preset has the tiny tokenizer's 512 embedding rows; its `-vocab` twin has Qwen2's 151936, where
     the LM head and the embedding table are a third of the weights (untied, as in most VLM language models);
  2. extracts its language model into a Qwen2ForCausalLM checkpoint (the same tensors, renamed) and converts it
     with `python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu` (--genai-prune-lm-head: plus its
     `prune_lm_head=true` option, which computes the prompt's logits for its last position only, as our graph
     does; the builder's default computes them for every prompt position); our INT4 graph is the same llm.onnx
     through apet-export's weight-only quantiser (int4 blocks of 32, symmetric; llm.cpu.onnx runs them as
     MatMulNBits, accuracy level 4, as onnxruntime-genai's model does);
  3. starts one fresh worker process per engine (so each peak RSS is that engine's own), loads the models, then
     sends the same token ids to the engines, which take turns request by request, who goes first alternating
     (so a busy machine's changing load hits them alike): prompts of 84 and 596 tokens, then 64 greedy steps,
     on 2 intra-op threads each. `--turns step` alternates at every decode step instead; on a 2-core machine
     that measures contention more than the engines (INT4 decode 36 against 68 tok/s per request, both
     engines alike; most likely onnxruntime's threads, which spin a while after each run, taking the cores
     from the next engine);
  4. `--floor` adds one engine per CPU graph that runs only its weight MatMuls (same weights, one row per
     step, the prompt's rows at once for the prefill): the floor no graph rewrite goes under, so `floor / genai`
     bounds the ratios any rewrite of that graph can reach on this machine;
  5. prints per precision: prefill ms, decode tok/s, peak RSS and the ratios ours / genai, the greedy-token
     agreement with genai and the max |difference| of the first step's logits.

Engines: `apet llm.onnx` is the exported graph as the runtime ran it before (KV cache fed back through Concat);
`apet in place` only writes the cache in place (TensorScatter + IO binding); `apet cpu form` is llm.cpu.onnx
(in place, onnxruntime's fused CPU ops: export/cpu_graph.py, export/cpu_fusions.py), what the onnxruntime backend runs when the build has it. Greedy, up to 64 tokens or EOS (both engines stop there); decode tok/s = (tokens - 1) /
time from the first token to the last. One short warm-up request per engine is not measured.
The machine is whatever it is when you run it: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

PRESET = "bench-llava-clip-l-qwen2-0.5b"
QUICK_PRESET = "tiny-llava-siglip-qwen2"
GENAI = "genai"
OURS_CONCAT, OURS_INPLACE, OURS_CPU = "apet llm.onnx", "apet in place", "apet cpu form"
FLOOR = " matmuls only"  # suffix of the floor engines: "genai matmuls only", "apet cpu form matmuls only"
INPLACE_GRAPH = "llm.inplace.onnx"  # the cache written in place, zero-bias adds kept (bench only)

# -- pure pieces (tested without building anything) ------------------------------------------------------


def prompt_ids(length: int, vocab_size: int, seed: int, exclude: set[int]) -> np.ndarray:
    """`length` reproducible token ids [length] int64 in [0, vocab_size), none of them in `exclude`
    (special and image tokens, which would change what the prompt means to the two engines)."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.array(sorted(exclude), dtype=np.int64))
    if len(allowed) == 0:
        raise ValueError(f"no token id in [0, {vocab_size}) outside the excluded {sorted(exclude)}")
    return np.random.default_rng(seed).choice(allowed, size=length).astype(np.int64)


LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.")  # transformers >= 4.52, older


def causal_lm_tensor_name(name: str) -> str | None:
    """A LLaVA checkpoint tensor name -> its name in a *ForCausalLM checkpoint, or None when the tensor is
    not part of the language model (vision tower, projector)."""
    for prefix in LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    return None


def causal_lm_config(llava_config: dict) -> dict:
    """The text_config of a LLaVA config.json as a standalone *ForCausalLM config."""
    text = dict(llava_config["text_config"])
    model_type = text.get("model_type", "qwen2")
    text["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]]
    text.setdefault("torch_dtype", "float32")
    return text


@dataclass
class Request:
    engine: str
    prompt_length: int
    prefill_ms: float
    decode_tokens_per_s: float
    tokens: list[int]
    first_logits: np.ndarray  # [V]


@dataclass
class Row:
    precision: str
    prompt_length: int
    engine: str
    prefill_ms: float  # median over requests
    decode_tokens_per_s: float  # median over requests
    peak_rss_mib: float
    prefill_ratio: float = 1.0  # this engine / genai (lower is better)
    decode_ratio: float = 1.0  # this engine / genai (higher is better)
    rss_ratio: float = 1.0
    tokens_agree: float = 1.0  # share of greedy tokens equal to genai's, position by position
    logits_max_diff: float = 0.0  # first step, against genai
    extra: dict = field(default_factory=dict)


def token_agreement(ours: list[int], theirs: list[int]) -> float:
    """Share of positions where the two greedy sequences agree, counting the longer one's extra tokens as
    disagreements (1.0: identical)."""
    if not ours and not theirs:
        return 1.0
    same = sum(a == b for a, b in zip(ours, theirs, strict=False))
    return same / max(len(ours), len(theirs))


def summarise(precision: str, requests: list[Request], peak_rss: dict[str, float]) -> list[Row]:
    """Per prompt length and engine: medians, and every engine against genai's requests of the same prompt."""
    rows = []
    for length in sorted({r.prompt_length for r in requests}):
        by_engine: dict[str, list[Request]] = {}
        for request in requests:
            if request.prompt_length == length:
                by_engine.setdefault(request.engine, []).append(request)
        reference = by_engine.get(GENAI)
        base = None
        for engine, runs in by_engine.items():
            row = Row(precision, length, engine, statistics.median(r.prefill_ms for r in runs),
                      statistics.median(r.decode_tokens_per_s for r in runs), peak_rss.get(engine, float("nan")))
            if reference:
                base = base or Row(precision, length, GENAI, statistics.median(r.prefill_ms for r in reference),
                                   statistics.median(r.decode_tokens_per_s for r in reference),
                                   peak_rss.get(GENAI, float("nan")))
                row.prefill_ratio = row.prefill_ms / base.prefill_ms
                row.decode_ratio = row.decode_tokens_per_s / base.decode_tokens_per_s
            if reference and engine.endswith(FLOOR):  # no tokens, and its memory holds every product at once
                row.rss_ratio = row.tokens_agree = row.logits_max_diff = float("nan")
            elif reference:
                row.rss_ratio = row.peak_rss_mib / base.peak_rss_mib
                row.tokens_agree = min(token_agreement(r.tokens, g.tokens) for r, g in zip(runs, reference, strict=False))
                row.logits_max_diff = max(
                    float(np.abs(r.first_logits - g.first_logits).max()) for r, g in zip(runs, reference, strict=False)
                )
            rows.append(row)
    return rows


# -- models ------------------------------------------------------------------------------------------------


def extract_causal_lm(checkpoint: Path, out: Path) -> Path:
    """The LLaVA checkpoint's language model as a *ForCausalLM checkpoint in `out` (config, weights, tokenizer)."""
    from safetensors.numpy import load_file, save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        for name, array in load_file(str(path)).items():
            renamed = causal_lm_tensor_name(name)
            if renamed is not None:
                tensors[renamed] = array
    if "lm_head.weight" not in tensors:
        raise ValueError(f"{checkpoint} has no lm_head weight")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(causal_lm_config(config), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, out / name)
    return out


def build_genai_model(causal_lm: Path, out: Path, precision: str, prune_lm_head: bool = False) -> Path:
    """onnxruntime-genai's model of `causal_lm` (its builder's CPU defaults; prune_lm_head: its option that
    computes the prompt's logits for the last position only, as apet-export's graph does)."""
    if (out / "genai_config.json").exists():
        return out
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(causal_lm), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    if prune_lm_head:
        command += ["--extra_options", "prune_lm_head=true"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=os.environ)
    return out


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_ours(build_dir: Path, work: Path, precision: str) -> Path:
    """work/apet-<precision>: the build's llm.onnx (fp32: hard-linked; int4: apet-export's weight-only
    quantiser), its CPU form llm.cpu.onnx, the embedding table and a manifest listing them. The build directory
    itself is left as it is."""
    from apet_export.export.cpu_graph import add_cpu_graph, write_cpu_graph
    from apet_export.manifest import load_manifest

    out = work / f"apet-{precision}"
    if (out / "manifest.json").exists():
        return out
    staging = work / f".apet-{precision}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = load_manifest(build_dir)
    llm = manifest.files["llm"].path
    if precision == "fp32":
        for path in build_dir.glob(f"{llm}*"):  # llm.onnx and its external data, if any
            if path.name == llm:
                link_or_copy(path, staging / path.name)
            else:  # onnx.load refuses external data with more than one hard link (a "hardlink attack")
                shutil.copy2(path, staging / path.name)
    else:
        from apet_export.calibration.quantize import quantize_weights

        quantize_weights(build_dir / llm, staging / llm, bits=4)
    link_or_copy(build_dir / manifest.files["embeddings"].path, staging / manifest.files["embeddings"].path)
    manifest.files = {name: manifest.files[name] for name in ("llm", "embeddings")}
    add_cpu_graph(staging, manifest)
    write_cpu_graph(staging / llm, staging / INPLACE_GRAPH, simplify=False)
    manifest.write(staging)
    os.replace(staging, out)
    return out


def weight_matmuls_graph(model: Path) -> Path:
    """<model>.matmuls.onnx beside `model`: only its weight products (MatMul, MatMulNBits, Gemm with a constant
    weight), each fed a graph input of its width, same weights (the external data stays where it is). Run at
    one row, it is the floor of a decode step: what the step costs with every other node free."""
    import onnx
    from onnx import TensorProto, helper

    out = model.with_name(f"{model.stem}.matmuls.onnx")
    if out.exists():
        return out
    source = onnx.load(str(model), load_external_data=False)
    graph = source.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    nodes, widths = [], {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "MatMulNBits", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = weights[node.input[1]]
        width = attributes["K"] if node.op_type == "MatMulNBits" else weight.dims[1 if attributes.get("transB") else 0]
        widths[f"rows_{width}"] = width  # x [M, K]
        nodes.append(helper.make_node(node.op_type, [f"rows_{width}", *node.input[1:]], [f"product_{len(nodes)}"],
                                      domain=node.domain, **attributes))
    used = {name for node in nodes for name in node.input[1:] if name}
    floor = helper.make_graph(
        nodes, "weight_matmuls", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", k]) for x, k in widths.items()],
        [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
        [weights[name] for name in sorted(used)])
    onnx.save_model(helper.make_model(floor, opset_imports=source.opset_import, ir_version=source.ir_version), str(out))
    return out


class FloorGeneration:
    """An engine's weight products alone (weight_matmuls_graph): the prompt's rows at once for the prefill, one
    row per decode step. Its tokens are none. (Every product gets every prompt row, the LM head too: an upper
    bound of the prefill floor where the graph computes the prompt's logits for its last position only.)"""

    def __init__(self, graph: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.widths = {i.name: i.shape[1] for i in self.session.get_inputs()}
        self.row = self.rows(1)

    def rows(self, count: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(count)
        return {name: rng.standard_normal((count, width)).astype(np.float32) for name, width in self.widths.items()}

    def prefill(self, ids, new_tokens):
        prompt = self.rows(len(ids))
        start = time.perf_counter()
        self.session.run(None, prompt)
        self.steps, self.new_tokens = 1, new_tokens
        return time.perf_counter() - start, -1, np.full(1, np.nan, np.float32)

    def done(self):
        return self.steps >= self.new_tokens

    def step(self):
        start = time.perf_counter()
        self.session.run(None, self.row)
        self.steps += 1
        return time.perf_counter() - start, -1, self.done()


# -- workers (one fresh process per engine) ------------------------------------------------------------------


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Generation:
    """One greedy request on one engine, driven from outside step by step so that the engines can take turns
    at every decode step (load changes on a busy machine then hit both alike): prefill(ids, new_tokens) ->
    (seconds, first token, first logits [V]); step() -> (seconds, token, done). Both engines stop after
    new_tokens tokens or at EOS (included), as onnxruntime-genai does."""

    def prefill(self, ids: np.ndarray, new_tokens: int):
        raise NotImplementedError

    def step(self):
        raise NotImplementedError


class OursGeneration(Generation):
    """apet-export's runtime: the runner the onnxruntime backend uses (or the bench-only in-place graph)."""

    def __init__(self, model_dir: Path, engine: str, threads: int):
        from apet_export.manifest import load_manifest
        from apet_export.runtime.backends.onnxrt import OnnxrtInPlaceLlmRunner, llm_runner
        from apet_export.runtime.embeddings import embedding_table

        self.manifest = load_manifest(model_dir)
        self.table = embedding_table(self.manifest.file(model_dir, "embeddings"))  # [V, H], mapped as the runtime does
        if engine == OURS_INPLACE:
            self.runner = OnnxrtInPlaceLlmRunner(model_dir / INPLACE_GRAPH, threads=threads)
        else:
            self.runner = llm_runner(model_dir, self.manifest, cpu_form=engine == OURS_CPU, threads=threads)
        self.runner.activate()
        eos = self.manifest.dims["eos_token_id"]
        self.eos = set(eos) if isinstance(eos, list) else {eos}

    def prefill(self, ids, new_tokens):
        length = len(ids)
        start = time.perf_counter()
        logits, self.cache = self.runner.infer(
            {"inputs_embeds": self.table[ids][None], "attention_mask": np.ones((1, length), np.int64),
             "position_ids": np.arange(length, dtype=np.int64)[None]}, check_inputs=False,
            cache=self.runner.new_cache(self.manifest, 1))
        self.tokens, self.length, self.new_tokens = [int(np.argmax(logits[0]))], length, new_tokens
        return time.perf_counter() - start, self.tokens[0], logits[0].copy()

    def done(self):
        return len(self.tokens) >= self.new_tokens or self.tokens[-1] in self.eos

    def step(self):
        position = self.length + len(self.tokens) - 1
        start = time.perf_counter()
        logits, self.cache = self.runner.infer(
            {"inputs_embeds": self.table[[self.tokens[-1]]][None], "attention_mask": np.ones((1, position + 1), np.int64),
             "position_ids": np.array([[position]], np.int64)}, check_inputs=False, cache=self.cache)
        self.tokens.append(int(np.argmax(logits[0])))
        return time.perf_counter() - start, self.tokens[-1], self.done()


class GenaiGeneration(Generation):
    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.og, self.model = og, og.Model(config)

    def prefill(self, ids, new_tokens):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        start = time.perf_counter()
        self.generator.append_tokens(ids.astype(np.int32)[None])  # runs the prefill
        prefilled = time.perf_counter()
        first_logits = np.asarray(self.generator.get_logits()).reshape(-1).copy()  # [V] (not timed)
        picking = time.perf_counter()
        self.generator.generate_next_token()  # picks the first token from the prefill's logits
        seconds = prefilled - start + time.perf_counter() - picking  # the prefill: append_tokens + the first pick
        self.tokens, self.new_tokens = [int(self.generator.get_next_tokens()[0])], new_tokens
        return seconds, self.tokens[0], first_logits

    def done(self):
        return len(self.tokens) >= self.new_tokens or self.generator.is_done()

    def step(self):
        start = time.perf_counter()
        self.generator.generate_next_token()  # one decode step, then the greedy pick
        self.tokens.append(int(self.generator.get_next_tokens()[0]))
        return time.perf_counter() - start, self.tokens[-1], self.done()


def worker(engine: str, model_dir: str, threads: int, connection) -> None:
    """Load one engine, answer ("prefill", ids, new_tokens) and ("step",) until None, then report this
    process's peak RSS."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        if engine.endswith(FLOOR):
            generation = FloorGeneration(Path(model_dir), threads)
        elif engine == GENAI:
            generation = GenaiGeneration(Path(model_dir), threads)
        else:
            generation = OursGeneration(Path(model_dir), engine, threads)
        connection.send("ready")
        while (message := connection.recv()) is not None:
            if message[0] == "prefill":
                answer = generation.prefill(*message[1:])
                connection.send((*answer, generation.done()))
            else:
                connection.send(generation.step())
        connection.send(peak_rss_mib())
    except EOFError:  # the parent is gone
        return
    except Exception as error:  # reported to the parent, which stops the run with it
        connection.send(error)


def ask(workers, engine: str, message):
    workers[engine][1].send(message)
    answer = workers[engine][1].recv()
    if isinstance(answer, Exception):
        raise RuntimeError(f"{engine} failed: {answer}") from answer
    return answer


def generate_in_turns(workers, order: list[str], ids: np.ndarray, new_tokens: int) -> dict[str, tuple]:
    """The same greedy request on every engine, the engines taking turns at the prefill and at every decode
    step. -> engine: (prefill s, decode s, tokens, first logits [V])."""
    state = {}
    for engine in order:
        seconds, token, logits, done = ask(workers, engine, ("prefill", ids, new_tokens))
        state[engine] = [seconds, 0.0, [token], logits, done]
    while not all(s[4] for s in state.values()):
        for engine in order:
            if not state[engine][4]:
                seconds, token, done = ask(workers, engine, ("step",))
                state[engine][1] += seconds
                state[engine][2].append(token)
                state[engine][4] = done
    return {engine: tuple(s[:4]) for engine, s in state.items()}


def run_precision(precision: str, models: dict[str, Path], lengths: list[int], new_tokens: int, requests: int,
                  threads: int, vocab_size: int, exclude: set[int], turns: str) -> list[Row]:
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        return measure(context, workers, precision, models, lengths, new_tokens, requests, threads, vocab_size, exclude,
                       turns)
    finally:
        for process, _ in workers.values():  # after a failure: no worker outlives the run
            if process.is_alive():
                process.terminate()


def measure(context, workers, precision, models, lengths, new_tokens, requests, threads, vocab_size, exclude, turns):
    for engine, path in models.items():  # loaded one after the other: peak RSS is each one's own
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(engine, str(path), threads, child), daemon=True)
        process.start()
        answer = parent.recv()
        if isinstance(answer, Exception):
            raise RuntimeError(f"{engine} failed to load: {answer}") from answer
        workers[engine] = (process, parent)
    for engine in workers:  # first runs allocate and plan: not measured
        generate_in_turns(workers, [engine], prompt_ids(16, vocab_size, seed=0, exclude=exclude), 4)
    results = []
    for request in range(requests):
        for length in lengths:
            ids = prompt_ids(length, vocab_size, seed=length, exclude=exclude)
            order = list(workers) if request % 2 == 0 else list(reversed(workers))  # alternate who goes first
            if turns == "step":
                generations = generate_in_turns(workers, order, ids, new_tokens)
            else:  # one whole request per engine, the others idle meanwhile
                generations = {engine: generate_in_turns(workers, [engine], ids, new_tokens)[engine] for engine in order}
            for engine, (prefill_s, decode_s, tokens, first_logits) in generations.items():
                rate = (len(tokens) - 1) / decode_s if len(tokens) > 1 else float("nan")
                results.append(Request(engine, length, prefill_s * 1e3, rate, tokens, first_logits))
                print(f"  {precision} {engine:14s} prompt {length:4d}: prefill {prefill_s * 1e3:8.1f} ms, "
                      f"decode {rate:6.1f} tok/s ({len(tokens)} tokens)", flush=True)
    peak = {}
    for engine, (process, connection) in workers.items():
        connection.send(None)
        peak[engine] = connection.recv()
        process.join()
    return summarise(precision, results, peak)


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="apet-export vs onnxruntime-genai (ratios: engine / genai)")
    for column in ("precision", "prompt", "engine", "prefill ms", "ratio", "decode tok/s", "ratio",
                   "peak RSS MiB", "ratio", "tokens = genai", "logits max diff"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.precision, str(r.prompt_length), r.engine, f"{r.prefill_ms:.1f}", f"{r.prefill_ratio:.2f}",
                      f"{r.decode_tokens_per_s:.2f}", f"{r.decode_ratio:.2f}", f"{r.peak_rss_mib:.0f}",
                      f"{r.rss_ratio:.2f}", f"{r.tokens_agree:.0%}", f"{r.logits_max_diff:.2e}")
    Console(width=200).print(table)


@click.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=None,
              help=f"an fp32 apet-export build of the preset [default: build/{PRESET}]")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="where the peer checkpoint and models go [default: <build>-vs-genai]")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "int4"]),
              default=("fp32", "int4"), show_default=True)
@click.option("--prompt", "lengths", multiple=True, type=int, default=(84, 596), show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--requests", default=3, show_default=True, help="requests per prompt length and engine")
@click.option("--threads", default=2, show_default=True, help="intra-op threads of every engine")
@click.option("--engines", default=f"{OURS_CONCAT},{OURS_INPLACE},{OURS_CPU}", show_default=True,
              help="our engines to measure next to genai (comma-separated)")
@click.option("--preset", default=PRESET, show_default=True,
              help=f"the model to build when --build has none (e.g. {PRESET}-vocab: Qwen2's real vocabulary size)")
@click.option("--genai-prune-lm-head", is_flag=True,
              help="build the peer with onnxruntime-genai's prune_lm_head option (last-position prompt logits)")
@click.option("--turns", type=click.Choice(["request", "step"]), default="request", show_default=True,
              help="engines take turns per request, or per decode step (on a small machine that halves both "
                   "engines' decode rate)")
@click.option("--floor", is_flag=True,
              help="also time each CPU engine's weight MatMuls alone (same weights; the prompt's rows at once, then "
                   "one row a step): the floor no graph rewrite can go under")
@click.option("--quick", is_flag=True, help=f"smoke run: {QUICK_PRESET}, fp32, one request, prompt 84, 8 tokens")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write the rows here")
def main(build_dir, work, precisions, lengths, new_tokens, requests, threads, engines, preset, genai_prune_lm_head,
         turns, floor, quick, json_out):
    from apet_export.export.build import BuildOptions, build
    from apet_export.manifest import load_manifest

    preset = QUICK_PRESET if quick else preset
    if quick:
        precisions, lengths, new_tokens, requests = ("fp32",), (84,), 8, 1
    build_dir = Path(build_dir or f"build/{preset}")
    if not (build_dir / "manifest.json").exists():
        build(BuildOptions(model=preset, out=build_dir))
    work = Path(work or f"{build_dir}-vs-genai")
    manifest = load_manifest(build_dir)
    dims = manifest.dims
    eos = dims["eos_token_id"]
    exclude = {dims["image_token_id"], *(eos if isinstance(eos, list) else [eos])}
    causal_lm = extract_causal_lm(build_dir / "model", work / "causal-lm")
    rows = []
    for precision in precisions:
        models = {name: build_ours(build_dir, work, precision) for name in engines.split(",")}
        peer = f"genai-{precision}{'-pruned' if genai_prune_lm_head else ''}"
        models[GENAI] = build_genai_model(causal_lm, work / peer, precision, genai_prune_lm_head)
        if floor:
            models[GENAI + FLOOR] = weight_matmuls_graph(models[GENAI] / "model.onnx")
            if OURS_CPU in models:
                models[OURS_CPU + FLOOR] = weight_matmuls_graph(models[OURS_CPU] / "llm.cpu.onnx")
        rows += run_precision(precision, models, list(lengths), new_tokens, requests, threads,
                              dims["vocab_size"], exclude, turns)
    print_table(rows)
    if json_out:
        json_out.write_text(json.dumps([{k: v for k, v in vars(r).items()} for r in rows], indent=2))


if __name__ == "__main__":
    main()
