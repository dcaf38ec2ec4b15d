"""Two-stage runtime: token parity of onnxruntime against the eager reference, the positions and caches
of each part, budgets and their errors."""

import numpy as np
import pytest
import torch

from apet_export.compression.budget import split_budget
from apet_export.errors import BudgetError, InvalidInputError
from apet_export.manifest import load_manifest
from apet_export.models.registry import budget_policy
from apet_export.parity.e2e import e2e_parity
from apet_export.parity.stage2 import stage2_parity
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline
from apet_export.runtime.two_stage import eager_stage2, image_spans
from tests.conftest import linked_copy

PROMPT = "Describe the image in detail."


def test_greedy_tokens_identical_to_the_eager_reference(any_two_stage_build):
    """32 greedy tokens at 64 (96/32) and 192 (288/96, or 256/128 for the 256-token SigLIP tower)."""
    manifest = load_manifest(any_two_stage_build)
    rows = e2e_parity(any_two_stage_build, manifest, synthetic_image(0))
    for row in rows:
        print(f"{row.check} {row.output}: max abs {row.max_abs:.3g} ({row.detail})")
    assert {row.check.split("k=")[1] for row in rows} == {
        "/".join(map(str, split_budget(b, manifest.budget["max"]))) for b in (64, 192)
    }
    assert all(row.passed for row in rows), rows
    assert all("identical (32 tokens)" in row.detail for row in rows if row.output == "token_ids")
    stage2 = stage2_parity(any_two_stage_build, manifest)
    print("largest stage-2 state diff:", max(r.max_abs for r in stage2 if r.output == "compressed_states"))
    assert stage2 and all(row.passed for row in stage2), stage2


@pytest.fixture(scope="module")
def torch_pipeline(llava_two_stage_build):
    with Pipeline.from_dir(llava_two_stage_build, backend="torch") as pipeline:
        yield pipeline


def test_stage2_off_is_the_hugging_face_decoder(torch_pipeline, llava_build):
    """budget1 alone keeps every image row in stage 2: the split layers, caches and masks must then give
    what the HF model's own forward gives on the one-graph build of the same checkpoint."""
    assert torch_pipeline.manifest.source["sha256"] == load_manifest(llava_build).source["sha256"]
    split = torch_pipeline.generate([synthetic_image(1)], PROMPT, budget1=64, max_new_tokens=16, stream=False)
    assert split.image_tokens == 64 and split.image_tokens_stage2 == 64
    with Pipeline.from_dir(llava_build, backend="torch") as whole:
        expected = whole.generate([synthetic_image(1)], PROMPT, budget=64, max_new_tokens=16, stream=False)
    assert split.token_ids == expected.token_ids
    np.testing.assert_allclose(split.first_logits, expected.first_logits, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_decode_positions_continue_from_each_parts_own_length(llava_two_stage_build, backend):
    """Prefill with stage 2 then one decode step equals recomputing from scratch: layers < K over the
    L1 + 1 rows at positions 0..L1, stage 2 on the first L1, layers >= K over L2 + 1 rows at 0..L2."""
    with Pipeline.from_dir(llava_two_stage_build, backend=backend) as pipeline:
        manifest, runner = pipeline.manifest, pipeline.backend.llm
        ids = pipeline.prompt_ids(PROMPT, 1)
        first, second = budget_policy(manifest).resolve(64)
        vision = pipeline.backend.vision.infer(
            {"pixel_values": pipeline.processor.image_processor([synthetic_image(2)], return_tensors="np")["pixel_values"],
             "keep": np.array(first)}, check_inputs=False,
        )
        embeds = pipeline.merge_embeddings(ids, vision["image_embeds"])  # [1, L1, H]
        length = embeds.shape[1]
        spans = image_spans(ids, manifest.dims["image_token_id"], first)
        feed = lambda e, start: {"inputs_embeds": e, "attention_mask": np.ones((1, start + e.shape[1]), np.int64),  # noqa: E731
                                 "position_ids": np.arange(start, start + e.shape[1])[None]}
        _, cache = runner.infer(feed(embeds, 0), check_inputs=False, cache=pipeline.backend.new_cache(1),
                                image_spans=spans, keep2=second)
        assert cache.shift == first - second
        token = pipeline.backend.embed(np.array([[5]]))  # [1, 1, H]
        decoded, cache = runner.infer(feed(token, length), check_inputs=False, cache=cache)

        whole = np.concatenate([embeds, token], axis=1)  # [1, L1 + 1, H]
        a_cache, b_cache = pipeline.backend.new_cache(1).first, pipeline.backend.new_cache(1).second
        hidden, _ = runner.first(feed(whole, 0), a_cache)
        (start, span), = spans
        cut = eager_stage2(np.ascontiguousarray(hidden[:, :length]), start, span, second, manifest.compression)["compressed_states"]
        rows = np.concatenate([cut, hidden[:, length:]], axis=1)  # [1, L2 + 1, H]
        b_feed = {"hidden_states": rows, "attention_mask": np.ones((1, rows.shape[1]), np.int64),
                  "position_ids": np.arange(rows.shape[1])[None]}
        expected, _ = runner.second(b_feed, b_cache)
    print(f"{backend}: decode vs recomputed logits max abs diff {np.abs(decoded - expected).max():.3g}")
    np.testing.assert_allclose(decoded, expected, atol=1e-4)


def test_a_prompt_without_an_image_makes_stage2_a_noop(torch_pipeline):
    ids = torch_pipeline.tokenizer("no picture here").input_ids
    assert image_spans(ids, torch_pipeline.manifest.dims["image_token_id"], 96) == []
    runner, backend = torch_pipeline.backend.llm, torch_pipeline.backend
    embeds = backend.embed(np.asarray([ids]))
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids))[None]}
    with_stage2, cache = runner.infer(feed, check_inputs=False, cache=backend.new_cache(1), image_spans=[], keep2=32)
    without, _ = runner.infer(feed, check_inputs=False, cache=backend.new_cache(1))
    assert cache.shift == 0
    np.testing.assert_array_equal(with_stage2, without)


def test_image_spans_of_several_images():
    ids = [1, 9, 2, 9, 3]  # two placeholders (id 9), each expanded to 4 rows
    assert image_spans(ids, 9, 4) == [(1, 4), (6, 4)]


def test_eager_stage2_splices_the_compressed_span():
    from apet_export.compression import ApetConfig, apet_compress

    hidden = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(0)).numpy()
    out = eager_stage2(hidden, 3, 30, 12, ApetConfig(num_basis=4))
    assert out["compressed_states"].shape == (2, 40 - 30 + 12, 16)
    np.testing.assert_array_equal(out["compressed_states"][:, :3], hidden[:, :3])
    np.testing.assert_array_equal(out["compressed_states"][:, 15:], hidden[:, 33:])
    expected = apet_compress(torch.from_numpy(hidden[:, 3:33]), 12, ApetConfig(num_basis=4))
    np.testing.assert_array_equal(out["keep_index"], expected.index.numpy())


@pytest.mark.parametrize(
    ("budget", "num_tokens", "expected"),
    [(64, 576, (96, 32)), (192, 576, (288, 96)), (65, 576, (97, 33)), (192, 256, (256, 128)), (576, 576, (576, 576))],
)
def test_split_budget_is_the_papers_average(budget, num_tokens, expected):
    first, second = split_budget(budget, num_tokens)
    assert (first, second) == expected and (first + second) / 2 == budget


def test_budget_resolution_and_errors(llava_two_stage_build, llava_build):
    two, one = budget_policy(load_manifest(llava_two_stage_build)).resolve, budget_policy(load_manifest(llava_build)).resolve
    assert two() == (96, 32)
    assert two(192) == (288, 96)
    assert two(budget1=100, budget2=40) == (100, 40)
    assert two(budget1=100) == (100, 100)  # stage 2 off
    assert two(budget1=11, budget2=11) == (11, 11)  # each stage goes down to M + 1 (the average to 2M + 1)
    assert one(64) == (64, None)
    with pytest.raises(InvalidInputError, match="above the stage-1 budget"):
        two(budget1=64, budget2=65)
    with pytest.raises(BudgetError, match="keep=10"):
        two(budget1=64, budget2=10)  # not above M = 10
    with pytest.raises(BudgetError):
        two(20)  # its stage-2 share would be 10
    with pytest.raises(InvalidInputError, match="needs --budget1"):
        two(budget2=32)
    with pytest.raises(InvalidInputError, match="not both"):
        two(64, budget1=96)
    with pytest.raises(InvalidInputError, match="no ApET stage 2"):
        one(budget1=96, budget2=32)


def test_parity_command_on_a_two_stage_build(llava_two_stage_build, tmp_path):
    from apet_export.parity.run import run_parity

    build = linked_copy(llava_two_stage_build, tmp_path / "build")  # parity.json is written here
    sections = run_parity(build, budgets=[64], pair=(80, 24))
    assert set(sections) == {"vision", "stage2", "e2e"}
    assert {row.check for row in sections["e2e"]} == {"greedy 32 tokens k=80/24"}
    assert all(row.passed for rows in sections.values() for row in rows)


@pytest.mark.parametrize("batch", [1, 2])
def test_stage2_follows_the_released_llm_stage(llava_two_stage_build, batch):
    """The released LLM stage writes `image_embeds[errors_indices[-k:]] = seed_features`: the basis goes into the
    top-k list's last M slots in top-k (descending error) order. stage2.onnx (onnxruntime) and the eager
    reference (eager_stage2) both against a literal rendering of it, on the same hidden states."""
    from apet_export.runtime.sessions import onnxruntime_session
    from tests.compression.reference import apet_reference, fps_reference

    manifest = load_manifest(llava_two_stage_build)
    assert manifest.compression.variant == "llava"  # the family's default: what the authors ran
    session = onnxruntime_session(manifest.file(llava_two_stage_build, "stage2"))
    start, length, keep = 5, 96, 32
    hidden = np.random.default_rng(batch).standard_normal((batch, start + length + 7, manifest.dims["text_hidden"]))
    hidden = (hidden * 3).astype(np.float32)
    feed = {"hidden_states": hidden, "image_start": np.array(start), "image_length": np.array(length), "keep": np.array(keep)}
    graph = dict(zip(["compressed_states", "keep_index", "scores"], session.run(None, feed), strict=True))
    eager = eager_stage2(hidden, start, length, keep, manifest.compression)
    for b in range(batch):
        span = torch.from_numpy(hidden[b, start : start + length])  # [N, H]
        basis = fps_reference(span, manifest.compression.num_basis, int(span.norm(dim=-1).argmax()))
        scores = torch.from_numpy(graph["scores"][b])
        ref_rows, ref_index = apet_reference(span, keep, basis, scores, rule="topk_slots")
        for name, out in (("stage2.onnx", graph), ("eager", eager)):
            assert out["keep_index"][b].tolist() == ref_index.tolist(), name
            rows = out["compressed_states"][b, start : start + keep]
            diff = float(np.abs(rows - ref_rows.numpy()).max())
            print(f"{name} b={b}: max abs diff against the released LLM stage {diff:.2e}")
            assert diff <= 1e-4, name
            np.testing.assert_array_equal(out["compressed_states"][b, :start], hidden[b, :start])
            np.testing.assert_array_equal(out["compressed_states"][b, start + keep :], hidden[b, start + length :])
