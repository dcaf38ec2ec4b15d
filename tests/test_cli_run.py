"""`apet-export run` output: JSON events, terminal-safe text, the plugin vision graph."""

import json

from apet_export.runtime.streaming import IncrementalDecoder
from tests.test_bad_inputs import assert_one_error_line
from tests.test_cli import run_cli


def json_events(capsys, build, *extra):
    code, out, err = run_cli(capsys, "run", str(build), "--prompt", "Hi", "--max-new-tokens", "6", "--json", *extra)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_json_is_one_event_per_token_then_a_summary(capsys, llava_build, monkeypatch):
    # end every answer inside a multi-byte character: the decoder's flush has text, which is no token
    monkeypatch.setattr(IncrementalDecoder, "flush", lambda self: "\ufffd")
    events = json_events(capsys, llava_build)
    *tokens, summary = events
    assert summary["event"] == "summary" and summary["generated_tokens"] == len(tokens) > 0
    assert all(e["event"] == "token" and isinstance(e["token_id"], int) for e in tokens)
    assert [e["token_id"] for e in tokens] == summary["token_ids"]
    assert [e["index"] for e in tokens] == list(range(len(tokens)))


def test_terminal_output_escapes_control_characters(capsys, llava_build, monkeypatch):
    original = IncrementalDecoder.push
    monkeypatch.setattr(IncrementalDecoder, "push", lambda self, token: "\x1b[2J\x07" + original(self, token))
    code, out, _ = run_cli(capsys, "run", str(llava_build), "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert out.startswith("\\x1b[2J\\x07")
    events = json_events(capsys, llava_build)  # --json carries the text as it is (JSON escapes it)
    assert events[0]["text"].startswith("\x1b[2J\x07")


def test_plugin_vision_graph_from_the_cli(capsys, llava_build):
    plain = json_events(capsys, llava_build)
    plugin = json_events(capsys, llava_build, "--vision-graph", "plugin")
    assert plugin[-1]["token_ids"] == plain[-1]["token_ids"] and plugin[-1]["image_tokens"] == 64
    code, out, err = run_cli(capsys, "run", str(llava_build), "--prompt", "Hi", "--vision-graph", "plugin",
                             "--backend", "torch")
    assert_one_error_line(code, out, err, "runs on the onnxruntime backend")


def test_bench_measures_each_budget_in_its_own_process(llava_build, monkeypatch):
    """Peak RSS comes from a fresh process per budget, not from this one (whose peak never goes down)."""
    from apet_export import bench

    monkeypatch.setattr(bench, "peak_rss_mib", lambda: -1.0)  # what this process would report
    rows = bench.run_bench(llava_build, budgets=[64], runs=1, max_new_tokens=2)  # children import afresh
    assert [r.budget for r in rows] == [576, 64]
    assert all(r.peak_rss_mib and r.peak_rss_mib > 50 for r in rows), [r.peak_rss_mib for r in rows]
    assert rows[1].peak_rss_mib <= rows[0].peak_rss_mib * 1.05  # 64 tokens need no more than 576
