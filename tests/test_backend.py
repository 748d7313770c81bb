"""Backend selection, fallback warnings, the info() report and the CPU SIMD switch."""

import warnings

import pytest
import torch

import minigpt.kernels as K
from minigpt.kernels import _backend


def test_default_backend_per_device():
    assert K.select_backend("rms_norm", torch.device("cpu")) == "cpp"
    assert _backend.default_backend(torch.device("cuda")) == "triton"
    assert _backend.default_backend(torch.device("meta")) == "torch"


def test_env_override(monkeypatch):
    monkeypatch.setenv("MINIGPT_BACKEND", "torch")
    assert K.select_backend("rms_norm", torch.device("cpu")) == "torch"
    # the per-call argument wins over the environment
    assert K.select_backend("rms_norm", torch.device("cpu"), "cpp") == "cpp"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="not a backend"):
        K.select_backend("rms_norm", torch.device("cpu"), "cuda")
    monkeypatch.setenv("MINIGPT_BACKEND", "fast")
    with pytest.raises(ValueError, match="MINIGPT_BACKEND"):
        K.select_backend("rms_norm", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.register_op("bogus", ("gpu",))


def test_missing_backend_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    _backend.register_op("only_reference_op", ())
    with pytest.warns(RuntimeWarning, match="falling back to the eager torch reference"):
        assert K.select_backend("only_reference_op", torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert K.select_backend("only_reference_op", torch.device("cpu")) == "torch"
    _backend._OPS.pop("only_reference_op")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    # patch the check, not the variable: Triton caches TRITON_INTERPRET when first read
    monkeypatch.setattr(_backend, "triton_interpreter", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA tensor"):
        assert K.select_backend("rms_norm", torch.device("cpu"), "triton") == "torch"
    monkeypatch.setattr(_backend, "triton_interpreter", lambda: True)
    assert K.select_backend("rms_norm", torch.device("cpu"), "triton") == "triton"


def test_cpp_backend_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="CPU tensors"):
        assert K.select_backend("rms_norm", torch.device("cuda"), "cpp") == "torch"


def test_info_reports_every_op(capsys):
    report = K.info()
    out = capsys.readouterr().out
    assert report["cpp"] is True
    for op, backends in K.registered_ops().items():
        assert op in report["ops"] and op in out
        if "cpp" in backends:
            assert report["ops"][op]["cpu"] == "cpp"
        else:
            assert report["ops"][op]["cpu"].startswith("torch (fallback")
    assert report["cpu_isa"] in ("avx512", "avx2", "scalar")


def test_force_cpu_isa_round_trip():
    best = torch.ops.minigpt.cpu_isa_detected()
    with K.force_cpu_isa("scalar"):
        assert K.cpu_isa() == "scalar"
    assert K.cpu_isa() == best
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        torch.ops.minigpt.set_cpu_isa("sse9")


def test_cli_info(capsys):
    from minigpt.cli import main

    assert main(["info"]) == 0
    assert "rms_norm" in capsys.readouterr().out
    assert main([]) == 0
    with pytest.raises(SystemExit):
        main(["no-such-command"])
