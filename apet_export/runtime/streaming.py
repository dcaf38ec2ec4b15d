"""Incremental detokenisation: text deltas that are correct for multi-byte characters, at a cost per token
that does not grow with the answer.

Byte-level tokens can split a UTF-8 character; decoding such a prefix gives U+FFFD. Each step decodes a
short window of ids twice (the same algorithm as Hugging Face TGI and vLLM):

    ids:  ... | prefix_offset ........ read_offset | new ids
                 `context`: already emitted        ^ text beyond the context is the delta

`context` = decode(ids[prefix_offset:read_offset]), `window` = decode(ids[prefix_offset:]). When `window`
is longer than `context` and does not end in U+FFFD, its extra text is complete: it is emitted and both
offsets move forward. The context token is decoded with the new ones so that tokenizers which drop a
leading space at the start of a decode (SentencePiece) still give the space to the delta.
"""

from __future__ import annotations

import unicodedata

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.pieces = tokenizer, [], []
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self.pieces)

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) <= len(context) or window.endswith(REPLACEMENT):
            return ""
        delta = window[len(context) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.pieces.append(delta)
        return delta

    def flush(self) -> str:
        """At the end: whatever is left, partial characters included (as U+FFFD)."""
        context = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        delta = window[len(context) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        if delta:
            self.pieces.append(delta)
        return delta


BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # can reorder what is shown


def printable(text: str) -> str:
    """Text for a terminal: control characters (ESC, BEL, backspace, carriage return, ...) and bidi
    overrides as visible escapes such as \\x1b, so that a model's output cannot move the cursor, recolour
    or retitle the terminal. Newlines and tabs stay; so do joiners and other format characters of emoji."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if (unicodedata.category(c) == "Cc" and c not in "\n\t") or c in BIDI_CONTROLS
        else c
        for c in text
    )
