"""tiny-r1: the project's own miniature distilled reasoning model.

A deterministic Python "teacher" (``tasks``) writes R1-style reasoning traces for
variable-chain arithmetic problems; a small Qwen2 student (``train``) is trained on
them with a byte-level BPE tokenizer (``tokenizer``) that uses Qwen2's pre-tokenizer
and DeepSeek-R1's special tokens and chat template.
"""
