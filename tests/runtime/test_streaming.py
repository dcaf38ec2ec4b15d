"""Incremental detokenisation (exact, bounded work per token) and terminal-safe text."""

import numpy as np
import pytest

from apet_export.runtime.streaming import IncrementalDecoder, printable


@pytest.fixture(scope="module")
def tokenizer(llava_build):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llava_build / "model", local_files_only=True)


def full_decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_deltas_add_up_to_the_full_decode_for_random_ids(tokenizer):
    """Random ids split characters everywhere (byte-level BPE): the stream must still equal one decode."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = rng.integers(0, len(tokenizer), 40).tolist()
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.push(t) for t in ids]
        assert "".join(deltas) + decoder.flush() == full_decode(tokenizer, ids) == decoder.text


def test_work_per_token_does_not_grow_with_the_answer(tokenizer, monkeypatch):
    text = "café 日本語 ✓ 😀 naïve. The quick brown fox jumps over the lazy dog. " * 30
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 500
    decoded_lengths = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded_lengths.append(len(ids)) or original(ids, **kw))
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert not any("\ufffd" in d for d in deltas)
    assert max(decoded_lengths) <= 6, max(decoded_lengths)  # a window of a few ids, not the whole answer (500+)


def test_printable_escapes_control_characters():
    assert printable("ok\x1b[2J\x07\r\b\x00") == "ok\\x1b[2J\\x07\\r\\x08\\x00"
    assert printable("\u202eevil") == "\\u202eevil"  # bidi override
    kept = "line 1\nline 2\tcafé 日本語 👨\u200d👩\u200d👧"  # newlines, tabs, joiners stay
    assert printable(kept) == kept
