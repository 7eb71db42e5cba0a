"""A real Hugging Face tokenizer directory built in the test: BPE trained on a small corpus.

Byte-level BPE (GPT-2 style) with <s> as BOS (added by the post-processor), </s> as EOS and
ChatML turn markers, saved as tokenizer.json + tokenizer_config.json with a chat template,
exactly the files a model directory ships. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Long-context training mixes short and very long sequences in one batch.",
    "A ring of ranks splits a long sequence; short ones are packed whole.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about rivers. Rivers carve the stone, slowly, patiently.",
    "Numbers like 12345 and 3.14159 appear in text too, with émigré accents.",
]

# ChatML with an optional system turn; a role outside system/user/assistant is an error.
CHATML = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The same rendering with the assistant turns marked for transformers' assistant masks.
CHATML_GENERATION = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Renders every assistant turn but the last without its content (as templates that drop
# past reasoning do): no prefix of the conversation renders as a prefix of the whole.
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_model_dir(path: Path, *, chat_template: str | None = CHATML) -> Path:
    """A model directory holding a freshly trained tokenizer (and a chat template)."""
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "model_max_length": 1 << 20}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
