"""The build's tokenizer without transformers: `model/tokenizer.json` through the `tokenizers` library and the
chat template rendered with jinja2 the way transformers renders it, so that a runtime that never imports
transformers gives the same token ids, text and special tokens as the checkpoint's own tokenizer.

What the runtime uses of a tokenizer, and nothing more:

    tokenizer(text, add_special_tokens, split_special_tokens).input_ids   (encode_with_user_text, prompts)
    tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)   (streaming)
    tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_template, added_tokens_decoder, convert_tokens_to_ids, len(tokenizer)
    bos/eos/unk/pad_token(_id) and the named media tokens (image_token, video_token ... and their _id)

Files read (those transformers 5 writes with save_pretrained; older layouts where noted):
    tokenizer.json                      the whole tokenizer (normaliser, pre-tokenizer, model, added tokens,
                                        post-processor that adds BOS, decoder)
    tokenizer_config.json               special tokens (bos_token ..., image_token ...), clean-up flag,
                                        chat_template (older layout: a string or a list of named templates)
    chat_template.jinja                 the chat template (takes priority over tokenizer_config's, as in
                                        transformers)
    special_tokens_map.json             named special tokens (older layout)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from apet_export.checkpoint import read_json_object
from apet_export.errors import ArtifactError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers' clean_up_tokenization: spaces before punctuation and English contractions removed on decode
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass
class Encoded:
    """What `tokenizer(text)` gives that the runtime reads."""

    input_ids: list[int]


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja, else tokenizer_config.json's (a string, or a list of
    {name, template} of which 'default' is used), else None (a model without one)."""
    file = model_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template


def _compile(template: str):
    """The template in transformers' environment: sandboxed, trim_blocks and lstrip_blocks, loop controls,
    its `tojson` (no HTML escaping) and the globals chat templates call (raise_exception, strftime_now)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(template)


class BuildTokenizer:
    """The checkpoint's tokenizer, read from the build's model/ directory with `tokenizers` and jinja2."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None, special_tokens: dict[str, str]):
        self._tokenizer = tokenizer  # tokenizers.Tokenizer
        self._splitting = None  # a copy that reads control-token strings as text (made on first use)
        self.chat_template = chat_template
        self._compiled = None
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers 5 skips the clean-up for BPE models (it would strip real spaces) unless this forces it
        self._clean_up_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self.special_tokens = special_tokens  # {attribute: token text}, named and extra (image_token ...)
        for attribute, token in special_tokens.items():
            setattr(self, attribute, token)
            setattr(self, f"{attribute}_id", self._tokenizer.token_to_id(token))

    @classmethod
    def from_dir(cls, model_dir: Path) -> BuildTokenizer:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        file = model_dir / "tokenizer.json"
        if not file.is_file():
            raise ArtifactError(
                f"{model_dir} has no tokenizer.json: the runtime reads the fast tokenizer the build saved; rebuild "
                f"the build (a checkpoint with a slow tokenizer only: save it once with its fast tokenizer)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # the Rust library raises its own Exception types for a bad file
            raise ArtifactError(f"{file} is not a readable tokenizer ({error}): rebuild the build") from None
        config_file = model_dir / "tokenizer_config.json"
        config = read_json_object(config_file, "rebuild the build") if config_file.is_file() else {}
        map_file = model_dir / "special_tokens_map.json"
        named = read_json_object(map_file, "rebuild the build") if map_file.is_file() else {}
        # as transformers 5 reads them: the named tokens, every other `*_token` key holding a token (image_token,
        # video_token ...) and a dict of extra_special_tokens (a list names no attributes: nothing to read)
        named.update({k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str | dict)})
        extra = config.get("extra_special_tokens")
        named.update(extra if isinstance(extra, dict) else {})
        special = {k: _token_text(v) for k, v in named.items() if isinstance(_token_text(v), str)}
        return cls(tokenizer, config, _chat_template(model_dir, config), special)

    # -- encode / decode ----------------------------------------------------------------------------------
    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> Encoded:
        """text -> ids; split_special_tokens: control-token strings in the text become ordinary text tokens."""
        tokenizer = self._tokenizer
        if split_special_tokens:
            # a second instance with the flag set for good, not the flag toggled on the shared one: a server's
            # request threads encode concurrently
            if self._splitting is None:
                from tokenizers import Tokenizer

                splitting = Tokenizer.from_str(self._tokenizer.to_str())
                splitting.encode_special_tokens = True
                self._splitting = splitting
            tokenizer = self._splitting
        return Encoded(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens).input_ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean_up and (type(self._tokenizer.model).__name__ != "BPE" or self._clean_up_bpe):
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def added_tokens_decoder(self) -> dict:
        """{id: AddedToken}: the tokens matched as whole strings before the model (control tokens)."""
        return self._tokenizer.get_added_tokens_decoder()

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    # -- chat template --------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """The conversation rendered with the chat template and the named special tokens (bos_token,
        eos_token ...) as transformers passes them; tokenize=True: its ids (the template writes BOS)."""
        if not self.chat_template:
            raise ArtifactError("the build's tokenizer has no chat template: rebuild from a checkpoint that has one")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        named = {k: v for k, v in self.special_tokens.items() if k in NAMED_SPECIAL_TOKENS}
        text = self._compiled.render(messages=conversation, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **{**named, **kwargs})
        return self(text, add_special_tokens=False).input_ids if tokenize else text
