"""Chat data: JSONL checking, template rendering with assistant-only labels, batching,
synthetic tasks (held-out splits, answers, wrong answers), GSM8K/HH loaders."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from chat_testing import tiny_model, tiny_tokenizer

from minigpt.data.chat import (
    IGNORE_INDEX,
    ChatBatches,
    check_messages,
    check_preference,
    encode_chat,
    encode_preference,
    fixed_batches,
    load_conversations,
    load_preferences,
    pack_by_length,
    pad_batch,
    read_jsonl,
)
from minigpt.data.eval_sets import EVAL_DIR, gsm8k_final_answer, hh_pair, load_gsm8k, load_hh_pairs
from minigpt.data.synthetic import (
    TASKS,
    answers_match,
    generate_tasks,
    make_example,
    split_of,
    wrong_answer,
)

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6 it is"},
]


# ---- masking -----------------------------------------------------------------------------


def test_labels_only_on_assistant_tokens_exact_positions():
    tok = tiny_tokenizer()
    sp = tok.special_tokens
    ex = encode_chat(tok, CONV)
    # build the rendering by hand: <bos> then per message <role> content <end>
    ids, graded = [sp["<|bos|>"]], [False]
    for m in CONV:
        body = tok.encode(m["content"]) + [sp["<|end|>"]]
        ids += [sp[f"<|{m['role']}|>"]] + body
        graded += [False] + [m["role"] == "assistant"] * len(body)
    assert ex.input_ids == ids[:-1]
    expected = [i if g else IGNORE_INDEX for i, g in zip(ids[1:], graded[1:])]
    assert ex.labels == expected
    # the graded targets spell exactly the two replies, each followed by <|end|>
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    end = sp["<|end|>"]
    assert targets == tok.encode("4") + [end] + tok.encode("6 it is") + [end]
    # role tokens (including <|assistant|>) are never targets
    assert sp["<|assistant|>"] not in targets and sp["<|user|>"] not in targets


def test_truncation_keeps_the_start_and_rejects_examples_without_targets():
    tok = tiny_tokenizer()
    full = encode_chat(tok, CONV)
    cut = encode_chat(tok, CONV, max_len=len(full) - 3)
    assert cut.input_ids == full.input_ids[: len(full) - 3]
    assert cut.labels == full.labels[: len(full) - 3]
    with pytest.raises(ValueError, match="no assistant token left within max_len=4"):
        encode_chat(tok, CONV, max_len=4, where="conv 9")


def test_preference_pairs_share_the_prompt_and_grade_only_the_reply():
    tok = tiny_tokenizer()
    pair = check_preference({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"})
    ex = encode_preference(tok, pair)
    n_prompt = len(tok.apply_chat_template(pair.prompt, add_generation_prompt=True)[0])
    assert ex.chosen.input_ids[:n_prompt] == ex.rejected.input_ids[:n_prompt]
    end = tok.special_tokens["<|end|>"]
    assert [t for t in ex.chosen.labels if t != IGNORE_INDEX] == tok.encode("4") + [end]
    assert [t for t in ex.rejected.labels if t != IGNORE_INDEX] == tok.encode("5") + [end]
    assert all(t == IGNORE_INDEX for t in ex.chosen.labels[: n_prompt - 1])


# ---- batching: one conversation per row, nothing crosses rows -------------------------------


def test_pad_batch_rows_do_not_leak():
    """A conversation's logits in a padded batch equal its logits alone (causal + padding after)."""
    tok = tiny_tokenizer()
    torch.set_num_threads(1)
    model = tiny_model(tok.vocab_size).eval()
    a = encode_chat(tok, CONV)
    b = encode_chat(tok, CONV[1:3])
    x, y = pad_batch([a, b], tok.pad_id)
    assert x.shape == (2, len(a)) and len(b) < len(a)
    assert (x[1, len(b) :] == tok.pad_id).all() and (y[1, len(b) :] == IGNORE_INDEX).all()
    with torch.no_grad():
        together = model(x)
        alone = model(torch.tensor([b.input_ids]))
    torch.testing.assert_close(together[1, : len(b)], alone[0], atol=1e-5, rtol=1e-5)


def test_pack_by_length_covers_everything_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    groups = pack_by_length(lengths, max_tokens=256, max_rows=16)
    assert sorted(i for g in groups for i in g) == list(range(200))
    for g in groups:
        assert len(g) <= 16 and len(g) * max(lengths[i] for i in g) <= 256
    # sorted by length: little padding overall
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < 1.2 * sum(lengths)
    with pytest.raises(ValueError, match="example 0 has 9 tokens > max_tokens=8"):
        pack_by_length([9], max_tokens=8)


def test_chat_batches_resume_exactly():
    tok = tiny_tokenizer()
    examples = [encode_chat(tok, e.messages()) for e in generate_tasks(30, seed=1)]
    a = ChatBatches(examples, 4, tok.pad_id, seed=3)
    for _ in range(5):
        next(a)
    b = ChatBatches(examples, 4, tok.pad_id, seed=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        for u, v in zip(next(a), next(b)):
            assert torch.equal(u, v)
    with pytest.raises(ValueError, match="does not fit"):
        ChatBatches(examples[:10], 4, 0).load_state_dict(a.state_dict())
    batches = fixed_batches(examples, tok.pad_id, max_tokens=200)
    assert sum(x.shape[0] for x, _ in batches) == 30


# ---- bad input ---------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_names_the_line(tmp_path):
    good = json.dumps({"messages": CONV})
    path = _write(tmp_path / "c.jsonl", [good, "", good, "{oops"])
    with pytest.raises(ValueError, match=r"c\.jsonl:4: not valid JSON"):
        load_conversations(path)
    assert [n for n, _ in read_jsonl(_write(tmp_path / "d.jsonl", [good, "", good]))] == [1, 3]
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"msgs": []}, r"x\.jsonl:2: missing key 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "message 0 has no 'content' key"),
        ({"messages": [{"content": "hi"}]}, "message 0 has no 'role' key"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "message 1 is an empty assistant turn",
        ),
    ],
)
def test_bad_conversations(tmp_path, record, message):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"messages": CONV}), json.dumps(record)])
    with pytest.raises(ValueError, match=message):
        load_conversations(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "q", "chosen": "a"}, r"p\.jsonl:1: missing key 'rejected'"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is an empty assistant reply"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be"),
        ({"prompt": "q", "chosen": 1, "rejected": "b"}, "'chosen' must be a string"),
    ],
)
def test_bad_preferences(tmp_path, record, message):
    path = _write(tmp_path / "p.jsonl", [json.dumps(record)])
    with pytest.raises(ValueError, match=message):
        load_preferences(path)


def test_preference_forms(tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    rec = {"prompt": msgs, "chosen": {"role": "assistant", "content": "a"}, "rejected": ["b"]}
    path = _write(tmp_path / "p.jsonl.gz", [])
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(rec) + "\n")
    (pair,) = load_preferences(path)
    assert pair.prompt == msgs and pair.chosen == "a" and pair.rejected == "b"
    assert check_messages(CONV) == CONV


# ---- synthetic tasks ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_splits_never_overlap():
    a = generate_tasks(120, "train", seed=5)
    assert a == generate_tasks(120, "train", seed=5)
    assert a != generate_tasks(120, "train", seed=6)
    assert [e.task for e in a[:6]] == list(TASKS)
    train = {e.prompt for s in range(3) for e in generate_tasks(600, "train", seed=s)}
    test = {e.prompt for s in range(3) for e in generate_tasks(300, "test", seed=s)}
    assert not train & test
    assert all(split_of(p) == "test" for p in test)
    assert len({e.prompt for e in generate_tasks(300, "test", seed=0)}) == 300  # distinct


def test_synthetic_answers_are_right():
    rng = random.Random(0)
    for _ in range(50):
        e = make_example("add", rng)
        a, b = e.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(e.answer) == int(a) + int(b)
        e = make_example("count", rng)
        target, seq = e.prompt.split('"')[1], e.prompt.split(": ", 1)[1].rstrip("?").split()
        assert int(e.answer) == seq.count(target) >= 1
        e = make_example("reverse", rng)
        assert e.answer.split() == e.prompt.split(": ")[1].split()[::-1]
        e = make_example("sort", rng)
        assert e.answer.split() == sorted(e.prompt.split(": ")[1].split())
        e = make_example("json_list", rng)
        assert json.loads(e.answer) == e.prompt.split(": ")[1].split(", ")
        e = make_example("qa", rng)
        assert e.answer in e.prompt.split("\n")[0]
    with pytest.raises(ValueError, match="unknown task"):
        generate_tasks(3, tasks=["add", "poetry"])
    with pytest.raises(ValueError, match="split"):
        generate_tasks(3, "dev")


def test_wrong_answers_are_wrong_and_plausible():
    rng = random.Random(1)
    for e in generate_tasks(300, seed=2):
        w = wrong_answer(e, rng)
        assert not answers_match(w, e.answer) and w.strip()
        if e.task in ("add", "count"):
            assert w.isdigit()
        if e.task in ("reverse", "sort"):
            assert sorted(w.split()) == sorted(e.answer.split())  # same words, wrong order


# ---- real sets ----------------------------------------------------------------------------------


def test_gsm8k_and_hh_loaders():
    assert EVAL_DIR.is_dir(), f"shared eval data missing at {EVAL_DIR}"
    recs = load_gsm8k("test", limit=3)
    assert len(recs) == 3 and recs[0]["final"] == "18"
    assert recs[0]["messages"][0]["role"] == "user" and "####" in recs[0]["messages"][1]["content"]
    assert gsm8k_final_answer("so\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="no '#### <number>'"):
        gsm8k_final_answer("no answer here")
    pairs = load_hh_pairs(limit=4)
    assert len(pairs) == 4
    for p in pairs:
        assert p.prompt[-1]["role"] == "user" and p.chosen != p.rejected
    pair = hh_pair("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away")
    assert pair.prompt == [{"role": "user", "content": "hi"}] and pair.rejected == "go away"
    with pytest.raises(ValueError, match="same prompt"):
        hh_pair("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")
