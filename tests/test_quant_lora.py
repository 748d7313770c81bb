"""Tests of LoRA (minigpt.nn.lora) on float and quantized (QLoRA) bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minigpt.kernels.quant import quant_linear, quantize_weight
from minigpt.nn.lora import LoRALinear, add_lora, merge_lora
from minigpt.quant import NF4, Int4WeightOnly, quantize_


def test_quant_linear_input_gradient_matches_reference():
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(24, 64), "nf4")
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(3, 64, requires_grad=True)
    dy = torch.randn(3, 24)
    dx, db = torch.autograd.grad(quant_linear(x, qw, bias), (x, bias), dy)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = bias.detach().clone().requires_grad_()
    y_ref = quant_linear(x_ref, qw, b_ref, backend="torch")
    dx_ref, db_ref = torch.autograd.grad(y_ref, (x_ref, b_ref), dy)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, db_ref)


@pytest.mark.parametrize("config", [None, NF4(), Int4WeightOnly(32)], ids=["float", "nf4", "int4"])
def test_lora_training_reduces_loss_and_merge_matches(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    teacher = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    if config is not None:
        quantize_(model, config)
    add_lora(model, rank=4, alpha=8, target_modules=("0", "2"))
    assert isinstance(model[0], LoRALinear)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4  # A and B of the two layers; the base is frozen
    x = torch.randn(64, 64)
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert type(model[0]) is nn.Linear
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_lora_bad_inputs():
    with pytest.raises(TypeError):
        LoRALinear(nn.ReLU())
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="no linear"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), target_modules=("q_proj",))
