"""nn.RMSNorm: the module wrapper around the fused ops."""

import torch

from minigpt.kernels.reference import add_rms_norm_reference, rms_norm_reference
from minigpt.nn import RMSNorm


def test_rmsnorm_module_matches_reference_and_trains():
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, 1e-5))
    norm(x).square().mean().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert "48, eps=1e-05" in repr(norm)


def test_rmsnorm_module_residual_form():
    norm = RMSNorm(16)
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    y, h = norm(x, r)
    y_ref, h_ref = add_rms_norm_reference(x, r, norm.weight, norm.eps)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
