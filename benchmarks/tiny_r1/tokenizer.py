"""Byte-level BPE tokenizer with the Qwen2 pre-tokenizer and DeepSeek-R1's special tokens."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .tasks import LEVELS, make_problem

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, PAD]
NON_SPECIAL_ADDED = [THINK_OPEN, THINK_CLOSE]
VOCAB_SIZE = 512

# R1-style chat template: BOS, system content, <｜User｜>..., <｜Assistant｜>... with earlier
# thinking (everything up to and including the last </think>) dropped from assistant turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{{ message['content'] }}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def corpus(n_per_level: int = 600, seed: int = 777):
    rng = random.Random(seed)
    for level in LEVELS:
        for _ in range(n_per_level):
            p = make_problem(rng, level)
            yield p.question
            yield p.trace + "\n" + p.target()[len(p.trace):]


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(NON_SPECIAL_ADDED)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    return tok


def save_tokenizer(out_dir: str | Path, tok: Tokenizer | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tok or build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    added = {}
    for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t in SPECIAL_TOKENS,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1024,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2, ensure_ascii=False) + "\n"
    )
    return out_dir


def load_hf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def prompt_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def encode_example(tokenizer, problem) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked to -100; target ends with EOS."""
    p_ids = tokenizer(prompt_text(tokenizer, problem.question), add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(problem.target(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids


if __name__ == "__main__":
    import sys

    out = save_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_r1_tok")
    print(out)
