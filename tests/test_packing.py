"""Packed rows: several documents in one row behave exactly as if each were alone.

Covers the model side (``GPT(..., cu_seqlens=...)``: document-masked attention
and positions restarting at each document) and the data side
(:func:`minigpt.data.chat.pack_examples` and packed SFT batches).
"""

from __future__ import annotations

import pytest
import torch
from chat_testing import make_base_run, tiny_model, tiny_tokenizer

from minigpt.data.chat import (
    ChatBatches,
    encode_chat,
    fixed_batches,
    pack_examples,
    packed_batch,
    pad_batch,
)
from minigpt.data.synthetic import generate_tasks
from minigpt.model import GPT, GPTConfig
from minigpt.train import OptimConfig, TrainConfig, Trainer
from minigpt.train.config import load_config
from minigpt.train.sft import SFTConfig, run_sft, sft_loss


def _model(pos: str = "rope", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64, pos=pos, **kw
    )
    return GPT(cfg).eval()


def _packed_rows(lengths_per_row: list[list[int]], T: int, seed: int = 1):
    """Random documents packed into rows of T (the rest of each row is one padding doc)."""
    g = torch.Generator().manual_seed(seed)
    rows, docs, cu = [], [], [0]
    for lengths in lengths_per_row:
        row = []
        for n in lengths:
            d = torch.randint(0, 97, (n,), generator=g)
            docs.append((len(rows), sum(map(len, row)), d))
            row.append(d)
            cu.append(cu[-1] + n)
        pad = T - sum(lengths)
        if pad:
            row.append(torch.zeros(pad, dtype=torch.long))
            cu.append(cu[-1] + pad)
        rows.append(torch.cat(row))
    return torch.stack(rows), torch.tensor(cu), docs


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_logits_equal_each_document_alone(pos):
    # learned positions make the check also prove that positions restart at 0
    model = _model(pos)
    idx, cu, docs = _packed_rows([[5, 9, 2], [17], [1, 3, 12]], T=20)
    with torch.no_grad():
        packed = model(idx, cu_seqlens=cu)
        for row, start, d in docs:
            alone = model(d[None])[0]
            torch.testing.assert_close(
                packed[row, start : start + len(d)], alone, atol=1e-5, rtol=0
            )


def test_packed_positions_restart_and_default_path_unchanged():
    model = _model()
    idx, cu, _ = _packed_rows([[3, 4], [7]], T=8)
    pos, (cu_out, longest) = model._packing(idx, cu, None, None)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 0]]
    assert longest == 7 and cu_out.tolist() == cu.tolist()
    # one document per row is the plain causal model
    with torch.no_grad():
        whole = torch.arange(0, 17, 8)
        torch.testing.assert_close(model(idx, cu_seqlens=whole), model(idx), atol=1e-5, rtol=0)


def test_packed_gradients_equal_the_sum_over_documents():
    model = _model().train()
    idx, cu, docs = _packed_rows([[6, 5], [4, 7]], T=12)
    targets = torch.full_like(idx, -100)
    n_targets = 0
    for row, start, d in docs:  # predict each document's own next tokens only
        targets[row, start : start + len(d) - 1] = d[1:]
        n_targets += len(d) - 1
    model(idx, targets, cu_seqlens=cu).backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for _, _, d in docs:  # the packed loss is the token-weighted mean of the documents' losses
        (model(d[None, :-1], d[None, 1:]) * (len(d) - 1) / n_targets).backward()
    for a, b in zip(packed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "cu, message",
    [
        ([0, 5, 12], "end at B\\*T"),
        ([1, 5, 16], "start at 0"),
        ([0, 5, 5, 16], "strictly increasing"),
        ([0, 5, 10, 16], "every row start"),
        ([[0, 16]], "1-D"),
    ],
)
def test_bad_cu_seqlens_error_clearly(cu, message):
    model = _model()
    idx = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises((ValueError, TypeError), match=message):
        model(idx, cu_seqlens=torch.tensor(cu))


def test_packing_refuses_kv_cache_and_positions():
    model = _model()
    idx = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="int32/int64"):
        model(idx, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="kv_cache or positions"):
        model(idx, positions=torch.arange(8), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="kv_cache or positions"):
        model(idx, kv_cache=object(), cu_seqlens=torch.tensor([0, 8]))


# ---- data: packing conversations into rows ---------------------------------------------------


def _chat_examples(n: int, seed: int = 0):
    tok = tiny_tokenizer()
    return tok, [encode_chat(tok, e.messages()) for e in generate_tasks(n, seed=seed, unique=False)]


def test_pack_examples_fits_whole_examples_and_rejects_long_ones():
    lengths = [7, 3, 5, 1, 8, 2, 4, 4, 6]
    rows = pack_examples(lengths, pack_len=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 40 tokens in rows of 10: best-fit leaves no row half empty
    with pytest.raises(ValueError, match="example 1 has 11 tokens; packing needs 1..pack_len=10"):
        pack_examples([3, 11], pack_len=10)


def test_packed_batch_labels_stay_inside_each_conversation():
    tok, examples = _chat_examples(3)
    rows = [examples[:2], examples[2:]]
    x, y, cu = packed_batch(rows, 64, tok.pad_id)
    assert x.shape == y.shape == (2, 64)
    a, b, c = (len(e) for e in examples)
    assert cu.tolist() == [0, a, a + b, 64, 64 + c, 128]
    assert x[0, : a + b].tolist() == examples[0].input_ids + examples[1].input_ids
    assert y[0, : a + b].tolist() == examples[0].labels + examples[1].labels
    # the last position of a conversation predicts its own final token, not the next start
    assert y[0, a - 1] == examples[0].labels[-1] != -100
    assert x[0, a] == examples[1].input_ids[0] and examples[1].input_ids[0] not in y[0, :a]
    assert (y[0, a + b :] == -100).all() and (y[1, c:] == -100).all()  # padding is never graded
    with pytest.raises(ValueError, match="row 0 holds"):
        packed_batch(rows, a, tok.pad_id)


def test_packed_sft_loss_equals_the_padded_loss():
    tok, examples = _chat_examples(9, seed=2)
    model = tiny_model(tok.vocab_size).eval()
    rows = [[examples[i] for i in r] for r in pack_examples(list(map(len, examples)), 128)]
    assert len(rows) < len(examples)  # several conversations share a row
    with torch.no_grad():
        packed = sft_loss(model, packed_batch(rows, 128, tok.pad_id))
        padded = sft_loss(model, pad_batch(examples, tok.pad_id))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_packed_chat_batches_resume_and_save_padding():
    tok, examples = _chat_examples(60, seed=1)
    a = ChatBatches(examples, 4, tok.pad_id, seed=3, pack_len=128)
    assert a.padding_fraction() < 0.1 < ChatBatches(examples, 4, tok.pad_id).padding_fraction()
    for _ in range(3):
        next(a)
    b = ChatBatches(examples, 4, tok.pad_id, pack_len=128)
    b.load_state_dict(a.state_dict())
    for u, v in zip(next(a), next(b)):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="pack_len=None"):
        ChatBatches(examples, 4, tok.pad_id).load_state_dict(a.state_dict())


def test_sft_with_packing_reduces_the_loss(tmp_path):
    tok, train = _chat_examples(64)
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size)
    val = fixed_batches(train[:16], tok.pad_id)
    cfg = TrainConfig(batch_size=2, max_steps=30, progress=False, device="cpu", precision="fp32")
    trainer = Trainer(
        model,
        cfg,
        OptimConfig(lr=3e-3, warmup_steps=3),
        ChatBatches(train, 2, tok.pad_id, pack_len=128),
        loss_fn=sft_loss,
        val_batches=lambda: iter(val),
    )
    before = trainer.evaluate()["val_loss"]
    trainer.fit()
    after = trainer.evaluate()["val_loss"]
    assert after < 0.8 * before, (before, after)
    # the stage wires it up: data.pack=true packs rows of train.seq_len tokens
    base = make_base_run(tmp_path / "base")
    small = [f"base={base}", "data.pack=true", "data.num_examples=48", "data.val_examples=8"]
    small += ["train.batch_size=2", "train.eval_every_steps=0", "train.progress=false"]
    small += ["train.device=cpu", "train.precision=fp32", "threads=1"]
    log: list[str] = []
    cfg = load_config(SFTConfig, None, [*small, "train.max_steps=3"])
    assert run_sft(cfg, tmp_path / "run", print_fn=log.append)["step"] == 3
    assert any("packed rows of 128 tokens" in line for line in log)
    cfg = load_config(SFTConfig, None, [*small, "train.seq_len=64"])
    with pytest.raises(ValueError, match="data.pack needs data.max_len"):
        run_sft(cfg, tmp_path / "bad", print_fn=log.append)
