"""Incremental detokenisation: text deltas that are correct for multi-byte characters.

Byte-level tokens can split a UTF-8 character; decoding such a prefix gives U+FFFD. We decode the whole
generated sequence each step and emit only the new, complete suffix.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        text = self._decode()
        if text.endswith(REPLACEMENT) or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        """At the end: whatever is left, partial characters included (as U+FFFD)."""
        text = self._decode()
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return delta
