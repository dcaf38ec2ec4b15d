"""A real byte-level BPE tokenizer trained offline on a small built-in corpus, for the tiny presets, and
`encode_with_user_text`, which every family's prompt goes through (with the checkpoint's transformers
tokenizer at build time, the build's tokenizer at run time: models/build_tokenizer.py).

Byte-level: every UTF-8 string encodes (no <unk>) and decodes back exactly, multi-byte characters included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # transformers is imported where the tiny tokenizer is built: a runtime never needs it
    from transformers import PreTrainedTokenizerFast

CORPUS = [
    "A picture is worth a thousand words. The image shows a small red house next to a tall green tree.",
    "USER: What is in the image? ASSISTANT: There is a cat sitting on a wooden table near the window.",
    "The quick brown fox jumps over the lazy dog. Describe the scene in detail, please.",
    "Large language models can look at pictures when a vision encoder turns pixels into tokens.",
    "The sky is blue, the grass is green, and the sun is bright and yellow over the hills.",
    "How many people are standing in the photo? Two people are standing near a bicycle.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\",
    "Unicode: café naïve résumé façade 日本語 中文 한국어 Ελληνικά русский ✓ ★ → € £ 😀",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4

# LLaVA-1.5 conversation format. Content may be a string or a list of {"type": "image" | "text"} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set prefix = '' %}{% else %}"
    "{% set prefix = message['role'] | upper + ': ' %}{% endif %}"
    "{{ prefix }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_tokenizer(
    vocab_size: int = 512, max_length: int = 2048, extra_special_tokens: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE, eos_token: str = "</s>",
) -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer. Defaults: LLaVA-1.5 (`<image>`). Other families pass their named special tokens
    (e.g. {"image_token": "<|image_pad|>", ...}), appended after SPECIAL_TOKENS, their template and EOS."""
    from transformers import PreTrainedTokenizerFast

    named = extra_special_tokens or {"image_token": "<image>"}  # -> tokenizer.image_token(_id), used by processors
    specials = SPECIAL_TOKENS + [t for t in (*named.values(), eos_token) if t not in SPECIAL_TOKENS]
    specials = list(dict.fromkeys(specials))
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=eos_token,
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=named,
        padding_side="left",
        chat_template=chat_template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


# Where the user's text goes when a chat template is rendered to find the text around it (private-use
# characters: no template or tokenizer gives them a meaning).
USER_TEXT_MARK = "\ue000user text\ue000"


def _control_strings(tokenizer) -> list[str]:
    """The texts that the tokenizer turns into added (control) tokens when they occur in its input."""
    return [token.content for token in tokenizer.added_tokens_decoder.values()]


def encode_with_user_text(tokenizer, render, user_text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of render(user_text), a prompt in which only the text around the user's text may hold
    control tokens (BOS, <image>, <|im_start|> ...): typed `</s>` or `<|im_end|>` stays the characters typed.

    render: text -> the full prompt string (the chat template). When the user's text contains no control
    token string, the whole string is tokenised at once (the tokenisation the model was trained on);
    otherwise the text before and after it is tokenised as usual and the user's part with
    split_special_tokens=True, so its control-token strings become ordinary text tokens."""
    full = render(user_text)
    if not any(control in user_text for control in _control_strings(tokenizer)):
        return tokenizer(full, add_special_tokens=add_special_tokens).input_ids
    before, found, after = render(USER_TEXT_MARK).partition(USER_TEXT_MARK)
    if not found or not full.startswith(before) or not full.endswith(after):
        raise ValueError("the chat template does not place the user's text verbatim: cannot separate it")
    user = full[len(before) : len(full) - len(after)]  # what the template made of the text (e.g. trimmed)
    ids = tokenizer(before, add_special_tokens=add_special_tokens).input_ids if before or add_special_tokens else []
    ids += tokenizer(user, add_special_tokens=False, split_special_tokens=True).input_ids
    ids += tokenizer(after, add_special_tokens=False).input_ids if after else []
    return ids
