"""Backend registry, forcing, and clear errors on bad input before any kernel runs."""
import importlib.util

import pytest
import torch
from helpers import make_sae_tensors

import sae_fast
from sae_fast import dispatch, ops


def test_reference_always_available_and_default_for_cpu(monkeypatch):
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)
    assert "reference" in ops.available_backends()
    assert ops.get_backend("cpu").name == ("cpu" if "cpu" in ops.available_backends() else "torch")


def test_cpu_backend_is_built():
    import sae_fast._C  # noqa: F401  (the package's compiled kernels must import)
    assert "cpu" in ops.available_backends()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_cpu_tensors_never_route_to_triton(monkeypatch):
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)
    import triton  # noqa: F401  (importable, yet a CPU tensor must not go to it)
    assert ops.get_backend("cpu").name != "triton"
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(3, 4, 8)
    ops.topk_encode(x, W_enc, b_enc, b_dec, 2)  # runs without a GPU driver


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("SAE_FAST_BACKEND", "reference")
    assert ops.get_backend("cpu").name == "reference"
    monkeypatch.setenv("SAE_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="available backends: reference"):
        ops.get_backend("cpu")


def test_context_manager_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("SAE_FAST_BACKEND", "reference")
    with sae_fast.use_backend("torch"):
        assert ops.get_backend("cpu").name == "torch"
        with sae_fast.use_backend("reference"):
            assert ops.get_backend("cpu").name == "reference"
        assert ops.get_backend("cpu").name == "torch"
    assert ops.get_backend("cpu").name == "reference"


def test_unknown_backend_lists_available():
    unknown = r"backend 'cuda-magic' is not available here; available backends: .*reference"
    with pytest.raises(ValueError, match=unknown):
        with sae_fast.use_backend("cuda-magic"):
            pass


def test_backend_that_cannot_run_the_device():
    if "cpu" not in ops.available_backends():
        pytest.skip("cpu backend not built")
    with sae_fast.use_backend("cpu"):
        with pytest.raises(ValueError, match="cannot run on device 'meta'"):
            ops.get_backend("meta")


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    backend = dispatch.lookup_backend("torch")
    original = type(backend).topk_select
    monkeypatch.setattr(type(backend), "topk_select",
                        lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(3, 4, 8)
    with sae_fast.use_backend("torch"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 2)
    assert calls == [1]


# ----------------------------------------------------------------------------- sae-fast info
def _info_lines(capsys) -> dict[str, str]:
    from sae_fast import cli
    assert cli.main(["info"]) == 0
    first, *rest = capsys.readouterr().out.split("backends:", 1)[1].splitlines()
    rows = [first] + [line for line in rest if line.startswith(" " * 31)]  # one backend a line, indented
    return dict(line.strip().split(": ", 1) for line in rows)


def test_info_says_what_each_backend_runs_on_here(capsys):
    lines = _info_lines(capsys)
    assert set(lines) == set(ops.available_backends()) | set(dispatch.unavailable_backends())
    assert lines["reference"].startswith("any device")
    assert lines["torch"].startswith("any device")
    if "cpu" in lines:
        assert lines["cpu"].startswith("CPU tensors" if "cpu" in ops.available_backends() else "not available")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_info_says_triton_needs_cuda_or_the_interpreter(capsys, monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    line = _info_lines(capsys)["triton"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert line.startswith(f"installed; CUDA tensors ({f'{gpus} device(s)' if gpus else 'none here'}); ")
    assert line.endswith("CPU tensors when forced (TRITON_INTERPRET=1 is set)" if interpret == "1"
                         else "CPU only under TRITON_INTERPRET=1")


def test_info_says_why_a_backend_is_missing(capsys, monkeypatch):
    monkeypatch.delitem(dispatch._BACKENDS, "cpu", raising=False)
    monkeypatch.setitem(dispatch._MISSING, "cpu", "sae_fast._C is not built")
    assert _info_lines(capsys)["cpu"] == "not available: sae_fast._C is not built"


# ----------------------------------------------------------------------------- bad input
def _args():
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(4, 6, 10, requires_grad=False)
    return dict(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)


BAD = [
    (dict(x=torch.randn(4, 6, 1)), ValueError, r"x must be a 2-D \(batch, d_in\) tensor; got shape \(4, 6, 1\)"),
    (dict(x=torch.randn(0, 6)), ValueError, "at least one row"),
    (dict(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(W_enc=torch.randn(10, 5)), ValueError, r"W_enc must have shape \(\*, 6\); got shape \(10, 5\)"),
    (dict(b_enc=torch.randn(9)), ValueError, r"b_enc must have shape \(10\)"),
    (dict(b_dec=torch.randn(7)), ValueError, r"b_dec must have shape \(6\)"),
    (dict(W_enc=torch.randn(10, 6, dtype=torch.float64)), TypeError, "W_enc must have dtype torch.float32 like x"),
    (dict(W_enc=torch.randn(10, 6, device="meta")), ValueError, "W_enc is on meta but x is on cpu"),
    (dict(x=torch.tensor([[float("nan")] * 6] * 4)), ValueError, "x contains NaN or inf"),
    (dict(x=torch.tensor([[float("inf")] * 6] * 4)), ValueError, "x contains NaN or inf"),
]


@pytest.mark.parametrize("backend", ["reference", "torch"] + (["cpu"] if "cpu" in ops.available_backends() else []))
@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_encoder_input(backend, change, exc, match):
    args = {**_args(), **change}
    with sae_fast.use_backend(backend):
        with pytest.raises(exc, match=match):
            ops.topk_encode(args["x"], args["W_enc"], args["b_enc"], args["b_dec"], 2)


@pytest.mark.parametrize("k,exc,match", [(0, ValueError, "k must be between 1 and n_latents=10; got 0"),
                                         (11, ValueError, "got 11"), (2.0, TypeError, "k must be an int")])
def test_bad_k(k, exc, match):
    a = _args()
    with pytest.raises(exc, match=match):
        ops.topk_encode(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], k)


def test_finite_check_can_be_turned_off():
    a = _args()
    a["x"][0, 0] = float("nan")
    ops.set_check_finite(False)
    try:
        ops.topk_encode(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], 2)  # no error: the caller opted out
    finally:
        ops.set_check_finite(True)
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_encode(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], 2)


def test_bad_decode_input():
    W_dec, b_dec = torch.randn(10, 6), torch.randn(6)
    v, i = torch.rand(4, 3), torch.randint(0, 10, (4, 3), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_latents=10\); got values in \[0, 10\]"):
        too_big = torch.full((4, 3), 10, dtype=torch.int32).index_fill(1, torch.tensor([0]), 0)
        ops.sparse_decode(v, too_big, W_dec, b_dec)
    with pytest.raises(ValueError, match="got values in"):
        ops.sparse_decode(v, -i - 1, W_dec, b_dec)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        ops.sparse_decode(v, i.float(), W_dec, b_dec)
    with pytest.raises(ValueError, match=r"indices must have the shape of values \(4, 3\)"):
        ops.sparse_decode(v, i[:, :2], W_dec, b_dec)
    with pytest.raises(ValueError, match=r"b_dec must have shape \(6\)"):
        ops.sparse_decode(v, i, W_dec, torch.randn(5))
    with pytest.raises(TypeError, match="W_dec must have dtype"):
        ops.sparse_decode(v, i, W_dec.double(), b_dec)


def test_bad_dead_mask():
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(4, 6, 10)
    with pytest.raises(TypeError, match=r"dead_mask must be a bool tensor of shape \(10,\)"):
        ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 2, torch.ones(9, dtype=torch.bool), 2)
