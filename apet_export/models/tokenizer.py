"""A real byte-level BPE tokenizer trained offline on a small built-in corpus, for the tiny presets.

Byte-level: every UTF-8 string encodes (no <unk>) and decodes back exactly, multi-byte characters included.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
