"""Train the tiny-r1 student (a small Qwen2) on the teacher's R1-style traces.

    python -m edge.benchmarks.tiny_r1.train --out DIR --seed 0 --minutes 70

Initialisation and data order are deterministic given ``--seed``.  With only
``--minutes`` the cosine learning-rate schedule follows the wall clock (fraction
of the budget used), so the run ends on time even on a shared, contended CPU; the
number of steps it reached is recorded in ``train_config.json``.  ``--steps N``
switches to a step-driven schedule over exactly N steps, which is bit-for-bit
reproducible (the wall-clock budget then only acts as a safety deadline).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from .tasks import LEVELS, make_split, train_stream
from .tokenizer import encode_example, load_hf_tokenizer, prompt_text, save_tokenizer


def build_model(args, vocab_size: int, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(round(args.hidden * 2.75 / 32) * 32),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // args.head_dim,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    try:
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    except TypeError:
        model = Qwen2ForCausalLM(cfg)
    return model


class Batcher:
    """Seeded stream of length-bucketed, right-padded batches."""

    def __init__(self, tok, seed: int, batch_size: int, pool: int = 16, favour_hard: float = 0.0):
        self.tok = tok
        self.stream = train_stream(seed=1000 + seed, favour_hard=favour_hard)
        self.rng = random.Random(2000 + seed)
        self.bs, self.pool = batch_size, pool
        self.queue: list[list] = []

    def _refill(self):
        exs = [encode_example(self.tok, next(self.stream)) for _ in range(self.bs * self.pool)]
        exs.sort(key=lambda e: len(e[0]))
        batches = [exs[i : i + self.bs] for i in range(0, len(exs), self.bs)]
        self.rng.shuffle(batches)
        self.queue.extend(batches)

    def next(self):
        if not self.queue:
            self._refill()
        exs = self.queue.pop(0)
        n = max(len(e[0]) for e in exs)
        pad = self.tok.pad_token_id
        ids = torch.full((len(exs), n), pad, dtype=torch.long)
        lab = torch.full((len(exs), n), -100, dtype=torch.long)
        att = torch.zeros((len(exs), n), dtype=torch.long)
        for i, (x, y) in enumerate(exs):
            ids[i, : len(x)] = torch.tensor(x)
            lab[i, : len(y)] = torch.tensor(y)
            att[i, : len(x)] = 1
        return ids, att, lab


@torch.no_grad()
def evaluate(model, tok, problems, max_new_tokens: int = 512, batch_size: int = 32):
    """Greedy decode (KV cache via model.generate); per-level accuracy and thinking tokens."""
    from .tasks import check_answer

    model.eval()
    tok.padding_side = "left"
    think_close = tok.convert_tokens_to_ids("</think>")
    res: dict[int, list] = {lv: [] for lv in LEVELS}
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = tok([prompt_text(tok, p.question) for p in chunk], add_special_tokens=False,
                  return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        for p, g in zip(chunk, gen.tolist()):
            think = g.index(think_close) if think_close in g else len(g)
            text = tok.decode(g, skip_special_tokens=True)
            res[p.level].append((check_answer(text, p), think))
    tok.padding_side = "right"
    model.train()
    return {
        str(lv): {"acc": sum(c for c, _ in r) / len(r), "think_tokens": sum(t for _, t in r) / len(r)}
        for lv, r in res.items() if r
    }


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def save_checkpoint(model, tok_dir: Path, out: Path, config: dict, final: bool):
    from transformers import GenerationConfig

    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=False, max_new_tokens=1024,
    ).save_pretrained(str(out))
    if tok_dir != out:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / f).write_bytes((tok_dir / f).read_bytes())
    config = dict(config, final=final)
    (out / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=70.0, help="wall-clock budget (whole run)")
    ap.add_argument("--steps", type=int, default=0, help="fixed total steps (overrides the measured count)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--favour-hard", type=float, default=0.1, help="level weight 1 + f*(level-1)")
    ap.add_argument("--eval-every", type=float, default=6.0, help="minutes between validation evals")
    ap.add_argument("--eval-per-level", type=int, default=4)
    ap.add_argument("--ckpt-every", type=float, default=10.0, help="minutes between checkpoints")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.time()
    deadline = t0 + args.minutes * 60
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out)
    tok = load_hf_tokenizer(out)
    tok.padding_side = "right"
    vocab = int(math.ceil(len(tok) / 64) * 64)
    model = build_model(args, vocab, tok)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    batcher = Batcher(tok, args.seed, args.batch_size, favour_hard=args.favour_hard)
    val = [p for lv in LEVELS for p in [q for q in make_split("validation") if q.level == lv][: args.eval_per_level]]

    config = {
        "args": vars(args), "seed": args.seed, "n_params": n_params, "vocab_size": vocab,
        "tokenizer_len": len(tok), "model_config": model.config.to_dict(),
        "torch_version": torch.__version__, "threads": args.threads,
    }
    import transformers
    config["transformers_version"] = transformers.__version__
    curve = open(out / "learning_curve.jsonl", "w")

    def log(row):
        curve.write(json.dumps(row) + "\n")
        curve.flush()
        print(json.dumps(row), flush=True)

    log({"event": "start", "n_params": n_params, "vocab_size": vocab})
    total = args.steps or 10**9
    step, tokens, loss_acc, loss_n = 0, 0, 0.0, 0
    t_measure = None
    last_eval, last_ckpt = time.time(), time.time()
    eval_cost = 0.0
    stopped_early = False
    t_train0 = time.time()
    train_end = deadline - 90  # leave time for the final eval + save
    while step < total:
        if time.time() > (train_end if not args.steps else deadline - 20):
            stopped_early = True
            break
        if args.steps:
            lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        else:  # wall-clock driven: cosine over the fraction of the training budget used
            frac = (time.time() - t_train0) / max(1.0, train_end - t_train0)
            lr = lr_at(step, args.warmup + 10**6, args.lr, args.warmup, args.min_lr_ratio) if step < args.warmup \
                else args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, att, lab = batcher.next()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(att.sum())
        loss_acc += float(loss.detach())
        loss_n += 1
        if step == 5:
            t_measure = (time.time(), tokens)
        if step % args.log_every == 0:
            el = time.time() - t0
            log({"step": step, "elapsed_s": round(el, 1), "loss": round(loss_acc / loss_n, 4),
                 "lr": round(lr, 6), "tokens": tokens, "tokens_per_s": round(tokens / el, 1)})
            loss_acc, loss_n = 0.0, 0
        now = time.time()
        if now - last_eval >= args.eval_every * 60 and now < deadline - 120:
            te = time.time()
            r = evaluate(model, tok, val)
            eval_cost = max(eval_cost, time.time() - te)
            log({"step": step, "elapsed_s": round(time.time() - t0, 1), "eval": r,
                 "eval_s": round(time.time() - te, 1)})
            last_eval = time.time()
        if now - last_ckpt >= args.ckpt_every * 60:
            config.update(steps_done=step, tokens_seen=tokens, wall_time_s=time.time() - t0)
            save_checkpoint(model, out, out, config, final=False)
            log({"event": "checkpoint", "step": step, "elapsed_s": round(time.time() - t0, 1)})
            last_ckpt = time.time()

    config["total_steps"] = step
    if t_measure:
        config["tokens_per_s"] = (tokens - t_measure[1]) / max(1e-9, time.time() - t_measure[0])
    r = evaluate(model, tok, val) if time.time() < deadline - 10 else None
    if r:
        log({"step": step, "elapsed_s": round(time.time() - t0, 1), "eval": r, "final": True})
    config.update(steps_done=step, tokens_seen=tokens, stopped_early=stopped_early, wall_time_s=time.time() - t0)
    save_checkpoint(model, out, out, config, final=True)
    log({"event": "done", "step": step, "elapsed_s": round(time.time() - t0, 1)})
    curve.close()
    return model, tok, config


if __name__ == "__main__":
    main()
