"""Tiny R1-style checkpoints (Qwen2 and Llama) built on the fly for the conversion tests.

Each has random weights from a fixed seed, a byte-level BPE tokenizer trained here with the
architecture's real pre-tokenizer regex, DeepSeek-R1's special tokens, ``<think>``/``</think>``
as non-special added tokens and an R1-style chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge.convert.gguf_writer import PRE_TOKENIZERS

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"

CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

# Text to train the tokenizer on: enough variety that merges cover words, digits and CJK.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they'd call a test, isn't it?",
    "Let me think step by step. First, 12 + 35 = 47, then 47 * 3 = 141. So the answer is 141.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "我们来一步一步地思考这个问题。答案是四十二。数学很有趣！",
    "日本語のテキストも少し。こんにちは、世界。",
    "Émigré café naïve — résumé, coöperate; über straße. Ünïcödé!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 31415926 2718281828 2024-06-01 3.14159",
    "Emoji 🙂🚀✨ and symbols ∑ ∫ √ ≤ ≥ ≠ → ← © ® ™ € £ ¥",
    "Whitespace   runs\t\ttabs\n\n\nnew lines   \n  indented\r\nwindows line",
    "Wait, let me reconsider. Actually the integral of x^2 from 0 to 1 is 1/3.",
    "Question: What is the capital of France? Answer: Paris. We're sure; you'll see; I'm done.",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name; -- sql comment",
] * 3

# Text the tests tokenize with both tokenizers: every kind of thing that can go wrong.
TOKENIZER_TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "Digits 1234567890 and 3.14159 and 2024-06-01 and 1,000,000",
    "中文测试：我们来一步一步地思考。日本語もあります。",
    "Emoji 🙂🚀✨👩‍👩‍👧 mixed with text🙂text",
    "Whitespace   runs\t\ttabs\n\n\n  new\r\nlines    ",
    "It's I'M we'LL you'd THEY'RE",
    "Ünïcödé ëxtrâs — naïve café; ∑∫√ ≤≥≠",
    f"{BOS}{USER}What is 2+2?{ASSISTANT}{THINK}\nLet me think.\n{END_THINK}\n\nThe answer is 4.{EOS}",
    "inline <think> tags </think> inside text<think>x</think>",
    "def f(x):\n    return x ** 2  # square\n",
    "",
]

# Prompts the tests compare logits on.
LOGIT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Let me think step by step. First, 12 + 35 = 47.",
    "我们来一步一步地思考这个问题。",
    "def fib(n):\n    return n",
]


@dataclass(frozen=True)
class TinySpec:
    arch: str  # "qwen2" or "llama"
    hidden: int
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    vocab: int = 640  # tokenizer vocab target; the model's vocab_size is padded above it
    pad_vocab: int = 64  # embedding rows beyond the tokenizer's (a large table with a small tokenizer)
    tied: bool = False
    init_range: float = 0.02  # layers: small, so quantization noise is not amplified layer by layer
    embed_std: float = 0.045  # embeddings: large enough that outputs are peaked (see build_checkpoint)
    qk_std: float = 0.1  # Q/K projections: large enough that attention, and so RoPE, matters
    seed: int = 0


def train_tokenizer(arch: str, vocab_size: int):
    """A byte-level BPE tokenizer with the architecture's real pre-tokenizer and R1's tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    regex = PRE_TOKENIZERS["qwen2" if arch == "qwen2" else "llama-bpe"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if arch == "llama":
        # Llama-3's tokenizer takes whole words found in the vocab without applying merges, and
        # llama.cpp's llama-bpe pre-tokenizer does the same.
        data = json.loads(tok.to_str())
        data["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, USER, ASSISTANT)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_checkpoint(folder: Path, spec: TinySpec) -> Path:
    """Write a tiny HF checkpoint for ``spec`` into ``folder`` (safetensors + tokenizer files)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    raw = train_tokenizer(spec.arch, spec.vocab)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=EOS, add_bos_token=True, add_eos_token=False
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(folder)

    n_vocab = -(-len(raw.get_vocab()) // 64) * 64 + spec.pad_vocab  # padded, like real checkpoints
    common = dict(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.ffn,
        vocab_size=n_vocab,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=spec.init_range,
        tie_word_embeddings=spec.tied,
        bos_token_id=raw.token_to_id(BOS),
        eos_token_id=raw.token_to_id(EOS),
    )
    if spec.arch == "qwen2":
        config = Qwen2Config(rope_theta=10000.0, **common)
        model_cls = Qwen2ForCausalLM
    else:
        # llama3 RoPE scaling with a short original context, so the scaled band really is used.
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        config = LlamaConfig(rope_theta=500000.0, rope_scaling=rope, **common)
        model_cls = LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        # A random lm_head gives near-uniform next-token distributions whose top-1 flips under any
        # rounding. Stronger embeddings, with the output projection tied to (or correlated with)
        # them, make the residual stream carry the current token clearly, so distributions are
        # peaked, as in trained models, while the layers still shape them.
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, spec.embed_std)
        if not spec.tied:
            model.get_output_embeddings().weight.copy_(emb + 0.5 * spec.embed_std * torch.randn_like(emb))
        # With small Q/K weights attention is uniform and position-blind, and a RoPE or Q/K
        # layout bug would go unnoticed; sharper attention makes it show in the logits.
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0.0, spec.qk_std)
            layer.self_attn.k_proj.weight.normal_(0.0, spec.qk_std)
        # Random norms and biases, so a conversion that drops or misplaces them shows up.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
    return folder


def write_random_llama_gguf(path: Path, *, hidden: int = 1024, ffn: int = 4096, layers: int = 2, vocab: int = 256,
                            heads: int = 8) -> Path:
    """An f32 Llama GGUF of random weights and no tokenizer: what llama.cpp's quantizer needs and
    no more, large enough (~135 MB by default) that quantizing it takes seconds, so a test can
    interrupt it midway. Not loadable as a chat model."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32) if len(shape) > 1 else np.ones(shape, np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab, hidden)
    for i in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{name}.weight", hidden)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{name}.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
