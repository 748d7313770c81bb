"""DPO: the loss formula (with label smoothing) on hand-computed numbers, sequence
log-probs, cached vs on-the-fly reference, a tiny run that widens the margin,
exact resume, and bad settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chat_testing import make_base_run, tiny_model, tiny_tokenizer
from train_testing import one_thread

from minigpt.data.chat import check_preference, encode_preference
from minigpt.data.synthetic import generate_tasks
from minigpt.model.io import load_model
from minigpt.train.config import load_config
from minigpt.train.dpo import (
    DPOConfig,
    DPOLoss,
    DPOSettings,
    dpo_loss,
    pad_pairs,
    precompute_reference,
    run_dpo,
    sequence_logps,
)

_one_thread = pytest.fixture(autouse=True)(one_thread)
QUIET = dict(print_fn=lambda s: None)


def test_dpo_loss_matches_hand_computation():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # pair 0: chosen gained 1 nat vs the reference, rejected lost 1: z = beta * 2
    # pair 1: the policy equals the reference: z = 0, loss = log 2
    pc, pr, rc, rr = t(-1.0, -4.0), t(-3.0, -6.0), t(-2.0, -4.0), t(-2.0, -6.0)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-12)
    assert losses[1].item() == pytest.approx(math.log(2.0), rel=1e-12)
    assert chosen_r.tolist() == [0.5, 0.0] and rejected_r.tolist() == [-0.5, 0.0]
    # label smoothing eps: -(1-eps) log s(z) - eps log s(-z)
    eps = 0.1
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps)
    expected = (1 - eps) * math.log(1 + math.exp(-1.0)) + eps * math.log(1 + math.exp(1.0))
    assert smoothed[0].item() == pytest.approx(expected, rel=1e-12)
    assert smoothed[1].item() == pytest.approx(math.log(2.0), rel=1e-12)
    # gradient pushes the chosen log-prob up and the rejected one down, scaled by beta
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].sum().backward()
    assert pc.grad[0] < 0 < pr.grad[0]
    assert pc.grad[0].item() == pytest.approx(-0.5 / (1 + math.exp(1.0)), rel=1e-12)


def test_sequence_logps_sums_the_reply_tokens():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size).eval()
    pair = encode_preference(
        tok, check_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5 or so"})
    )
    batch = pad_pairs([pair], tok.pad_id)
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["labels"])
    for row, ex in enumerate([pair.chosen, pair.rejected]):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ex.input_ids]))[0].float(), -1)
        want = sum(logp[t, lab] for t, lab in enumerate(ex.labels) if lab != -100)
        assert got[row].item() == pytest.approx(float(want), abs=1e-4)


def _pairs(tok, n=24, seed=0):
    import random

    from minigpt.data.synthetic import wrong_answer

    rng = random.Random(seed)
    return [
        encode_preference(
            tok,
            check_preference(
                {"prompt": e.prompt, "chosen": e.answer, "rejected": wrong_answer(e, rng)}
            ),
        )
        for e in generate_tasks(n, seed=seed)
    ]


def test_cached_and_on_the_fly_reference_agree_and_start_at_log2():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size).eval()
    pairs = _pairs(tok, 8)
    ref = precompute_reference(model, pairs, tok.pad_id, batch_size=3)
    assert ref.shape == (8, 2)
    cached = DPOLoss(beta=0.1)(model, pad_pairs(pairs, tok.pad_id, ref))
    live = DPOLoss(beta=0.1, ref_model=model)(model, pad_pairs(pairs, tok.pad_id))
    # policy == reference: every reward is 0 and the loss is log 2
    assert cached.item() == pytest.approx(math.log(2), abs=1e-5)
    assert live.item() == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="no ref_logps and no reference model"):
        DPOLoss(beta=0.1)(model, pad_pairs(pairs, tok.pad_id))


def dpo_config(base, *overrides):
    return load_config(
        DPOConfig,
        None,
        [
            f"base={base}",
            "data.num_examples=48",
            "data.val_examples=12",
            "data.max_len=96",
            "train.batch_size=8",
            "train.max_steps=12",
            "train.eval_every_steps=0",
            "train.log_every_steps=4",
            "train.precision=fp32",
            "train.device=cpu",
            "train.progress=false",
            "threads=1",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "data.on_policy=false",
            *overrides,
        ],
    )


def test_run_dpo_widens_the_margin_and_resumes_exactly(tmp_path):
    base = make_base_run(tmp_path / "base")
    full = run_dpo(dpo_config(base), tmp_path / "full", **QUIET)
    # started at margin 0 (policy == reference); the training margin widens step after step
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    dpo_logs = [r for r in records if r["kind"] == "dpo"]
    margins = [r["reward_margin"] for r in dpo_logs]
    assert len(margins) == 3 and 0 < margins[0] < margins[1] < margins[2]
    assert dpo_logs[-1]["reward_acc"] >= 0.75
    # and it carries over (weakly, for a random 2-layer model) to held-out pairs
    assert full["val_reward_margin"] > 0 and full["val_loss"] < math.log(2)
    assert {"reward_chosen", "reward_rejected", "reward_acc"} <= set(dpo_logs[0])
    assert (tmp_path / "full" / "ref_logps.safetensors").is_file()
    assert (tmp_path / "full" / "pairs_train.jsonl").is_file()
    # interrupted at step 5, resumed: the same weights as the uninterrupted run
    run_dpo(dpo_config(base, "train.stop_at_step=5"), tmp_path / "part", **QUIET)
    run_dpo(dpo_config(base), tmp_path / "part", resume=tmp_path / "part", **QUIET)
    a, b = load_model(tmp_path / "full" / "model"), load_model(tmp_path / "part" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_run_dpo_on_the_fly_reference_and_jsonl(tmp_path):
    base = make_base_run(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    recs = [
        {"prompt": e.prompt, "chosen": e.answer, "rejected": e.answer + "!"}
        for e in generate_tasks(30)
    ]
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = run_dpo(
        dpo_config(base, f"data.source={data}", "dpo.precompute_ref=false", "train.max_steps=6"),
        tmp_path / "live",
        **QUIET,
    )
    assert out["val_reward_margin"] > 0
    assert not (tmp_path / "live" / "ref_logps.safetensors").exists()


def test_on_policy_pairs_reject_the_models_own_mistakes():
    from minigpt.train.dpo import PreferenceDataConfig, synthetic_pairs
    from minigpt.train.evaluate import greedy_answers

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size).eval()
    cfg = PreferenceDataConfig(tasks=["add", "reverse"])
    records, own = synthetic_pairs(cfg, "train", 6, model, tok)
    preds = greedy_answers(model, tok, [r["prompt"] for r in records])
    assert own == sum(1 for p, r in zip(preds, records) if p.strip() and p.strip() != r["chosen"])
    assert own > 0  # an untrained model is wrong, and says something
    for p, r in zip(preds, records):
        assert r["rejected"] != r["chosen"]
        if p.strip() and p.strip() != r["chosen"]:
            assert r["rejected"] == p.strip() and r["rejected_from"] == "model"
        else:
            assert r["rejected_from"] == "synthetic"


def test_errors_only_keeps_the_models_mistakes(tmp_path):
    from minigpt.train.dpo import PreferenceDataConfig, load_preference_data

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size).eval()
    cfg = PreferenceDataConfig(num_examples=6, val_examples=2, tasks=["add"], errors_only=True)
    train, val = load_preference_data(cfg, tmp_path, model, tok, print_fn=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "pairs_train.jsonl").open()]
    assert len(train) == len(records) >= 1 and len(val) == 2
    assert all(r["rejected_from"] == "model" for r in records)


def test_nll_term_adds_the_chosen_per_token_nll():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size).eval()
    pairs = _pairs(tok, 6)
    batch = pad_pairs(pairs, tok.pad_id, precompute_reference(model, pairs, tok.pad_id))
    with torch.no_grad():
        plain = DPOLoss(beta=0.1)(model, batch)
        with_nll = DPOLoss(beta=0.1, nll_weight=0.5)(model, batch)
        logps = sequence_logps(model, batch["input_ids"], batch["labels"])[:6]
        n_tokens = (batch["labels"][:6] != -100).sum(-1)
    nll = -(logps / n_tokens).mean()
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-5)


def test_bad_dpo_settings():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOSettings(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOSettings(label_smoothing=0.5)
    with pytest.raises(ValueError, match="nll_weight"):
        DPOSettings(nll_weight=-1.0)
    with pytest.raises(ValueError, match="unknown config key 'dpo.betta'"):
        load_config(DPOConfig, None, ["dpo.betta=1"])
