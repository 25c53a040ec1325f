"""Fast checks for tiny-r1: the teacher's invariants and a few student training steps."""
import random
import re
from types import SimpleNamespace

import pytest

from edge.benchmarks.tiny_r1 import tasks
from edge.benchmarks.tiny_r1.tasks import LEVELS, check_answer, extract_answer, make_problem, make_split


def test_trace_contains_every_step_and_correct_answer():
    rng = random.Random(0)
    for level in LEVELS:
        for _ in range(50):
            p = make_problem(rng, level)
            m = re.findall(r"([a-z]) = (\d+)\.", p.question)
            assert len(m) == 1
            vals = [int(m[0][1])]
            for var, src, op, k in re.findall(r"([a-z]) = ([a-z]) ([+-]) (\d)\.", p.question):
                vals.append(vals[-1] + int(k) if op == "+" else vals[-1] - int(k))
                assert 0 <= vals[-1] <= 99
                assert f"{var} = {src} {op} {k} = {vals[-2]} {op} {k} = " in p.trace
            assert len(vals) == level + 1 and p.answer == vals[-1]
            target = p.question.split("What is ")[1].rstrip("?")
            assert f"So {target} = {p.answer}." in p.trace
            names = re.findall(r"([a-z]) =", p.question)
            assert len(set(names)) == level + 1
            out = p.assistant_output()
            assert out.startswith("<think>\n") and out.endswith(f"</think>\n\n**Final Answer**\n\\boxed{{{p.answer}}}")
            assert check_answer(out, p)
            assert not check_answer(out.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}"), p)


def test_self_check_after_paragraph_break_and_slips_corrected():
    rng = random.Random(1)
    probs = [make_problem(rng, rng.choice(LEVELS)) for _ in range(2000)]
    checked = [p for p in probs if "Wait, let me check each step again." in p.trace]
    assert 0.85 < len(checked) / len(probs) < 0.95
    for p in checked:
        head, check = p.trace.split("\n\nWait, let me check each step again.\n")
        assert check.count("\n") == p.level  # the whole chain is worked again
        assert head.endswith(f" = {p.answer}.") and check.endswith(f"Yes, {p.question.split('What is ')[1][:-1]} = {p.answer}.")
    slips = [p for p in probs if ", not " in p.trace]
    assert slips
    for p in slips:
        for a, op, b, v, wrong in re.findall(r"Wait, (\d+) ([+-]) (\d) = (\d+), not (\d+)\.", p.trace):
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(v) and 1 <= abs(int(v) - int(wrong)) <= 2


def test_trace_length_grows_with_level():
    rng = random.Random(2)
    means = [sum(len(make_problem(rng, lv).trace) for _ in range(100)) / 100 for lv in LEVELS]
    assert all(a < b for a, b in zip(means, means[1:]))


def test_extract_answer():
    assert extract_answer("x \\boxed{3} then \\boxed{ 42 }") == 42
    assert extract_answer("so it is 7 or 12") == 12
    assert extract_answer("nothing") is None


def test_splits_deterministic_and_disjoint(tmp_path):
    test, val = make_split("test"), make_split("validation")
    assert len(test) == 400 and all(sum(p.level == lv for p in test) == 50 for lv in LEVELS)
    assert [p.question for p in test] == [p.question for p in tasks._held_out("test")]
    held = {p.question for p in test} | {p.question for p in val}
    assert not ({p.question for p in test} & {p.question for p in val})
    a, b = make_split("train", seed=5), make_split("train", seed=5)
    tr = [next(a) for _ in range(3000)]
    assert [p.question for p in tr[:50]] == [next(b).question for _ in range(50)]
    assert not ({p.question for p in tr} & held)
    for split, file in tasks.SPLIT_FILES.items():  # the shipped splits are the seeded ones
        rows = tasks.load_jsonl(tasks.write_split(split, tmp_path / file))
        assert rows == tasks.load_jsonl(tasks.DATA_DIR / file)
        assert set(rows[0]) == {"id", "level", "question", "answer"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    pytest.importorskip("transformers")
    from edge.benchmarks.tiny_r1.tokenizer import load_hf_tokenizer, save_tokenizer

    return load_hf_tokenizer(save_tokenizer(tmp_path_factory.mktemp("tok")))


def test_tokenizer_and_template(tok):
    from edge.benchmarks.tiny_r1.tokenizer import encode_example, prompt_text

    p = make_problem(random.Random(3), 4)
    pt = prompt_text(tok, p.question)
    assert pt == f"<｜begin▁of▁sentence｜><｜User｜>{p.question}<｜Assistant｜><think>\n"
    ids, labels = encode_example(tok, p)
    assert ids == tok(pt + p.target(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = sum(l == -100 for l in labels)
    assert tok.decode(ids[n_prompt:], skip_special_tokens=False) == p.target() + tok.eos_token
    # digits are split one by one; <think> is an added non-special token
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tok.convert_ids_to_tokens(tok("123 + 45")["input_ids"]) if t.strip("Ġ").isdigit())
    assert "<think>" in tok.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nA"}]
    assert tok.apply_chat_template(msgs, tokenize=False).endswith("<｜User｜>q<｜Assistant｜>\n\nA<｜end▁of▁sentence｜>")


def test_training_steps_reduce_loss(tok):
    import torch

    from edge.benchmarks.tiny_r1.train import Batcher, build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = SimpleNamespace(hidden=64, intermediate=176, layers=2, head_dim=32, kv_heads=1)
    model = build_model(args, 384, tok)
    assert model.config.num_key_value_heads < model.config.num_attention_heads and model.config.tie_word_embeddings
    batcher = Batcher(tok, seed=0, batch_size=8, pool=2)
    batches = [batcher.next() for _ in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        ids, att, lab = batches[step % 2]
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses
