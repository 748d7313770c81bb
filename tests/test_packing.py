"""Packed rows: several documents in one row behave exactly as if each were alone.

Covers the model side (``GPT(..., cu_seqlens=...)``: document-masked attention
and positions restarting at each document) and the data side
(:func:`minigpt.data.chat.pack_examples` and packed SFT batches).
"""

from __future__ import annotations

import pytest
import torch

from minigpt.model import GPT, GPTConfig


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
