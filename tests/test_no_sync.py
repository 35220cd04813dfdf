"""A training step reads nothing back to the host: whole steps (every activation, AuxK on, fused and
unfused, as the trainer runs them) with every tensor-to-host conversion trapped.

On CPU there is no device queue to stall, so the trap stands in for one: ``item``, ``tolist``,
``__bool__``/``__int__``/``__float__``/``__index__``, ``nonzero``, ``masked_select``, ``unique``,
``numpy`` and boolean-mask indexing raise. Allowed: the cpu backend's variable-length selections
(``threshold_select``, ``batch_topk_select``: ReLU/JumpReLU lists and BatchTopK size their outputs from
counts of their own CPU arrays). The triton backend's steps run here too, on CPU tensors under Triton's
interpreter, with nothing allowed but the interpreter itself (it runs the kernels in numpy: on a GPU that
is the device's work): its variable-length lists have widths fixed on the host, checked on the device.
Not yet run on CUDA under ``torch.cuda.set_sync_debug_mode("error")`` (no GPU in the session that wrote this).
"""
import contextlib
import copy
import os
import traceback

import pytest
import torch
from helpers import INTERPRETED_TRITON

import sae_fast
from sae_fast import SparseAutoencoder, ops
from sae_fast.checks import deferred_finite_checks, raise_if_nonfinite
from sae_fast.optim import UNIT_NORM_ACTIVATIONS, FusedAdam, make_adam, training_loss

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="needs the cpu backend (sae_fast._C)")

_ALLOWED = {"threshold_select", "batch_topk_select"}  # the cpu backend's, in sae_fast/backends/cpu.py
_ALLOW = {"cpu": True}  # which reads the trap lets through: the cpu backend's selections, or none but Triton's


class HostRead(AssertionError):
    pass


def _allowed() -> bool:
    stack = traceback.extract_stack()
    if _ALLOW["cpu"]:
        return any(f.name in _ALLOWED and "sae_fast/backends/cpu.py" in f.filename.replace("\\", "/") for f in stack)
    import triton  # the interpreter running a kernel (numpy): what a GPU does on the device
    home = os.path.dirname(triton.__file__)
    return any(f.filename.startswith(home) for f in stack)


def _trap(name, original):
    def trapped(*args, **kwargs):
        if not _allowed():
            raise HostRead(f"host read: Tensor.{name}")
        return original(*args, **kwargs)
    return trapped


def _bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def no_host_reads(monkeypatch, backend="cpu"):
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
             "unique", "numpy"]
    with monkeypatch.context() as m:
        m.setitem(_ALLOW, "cpu", backend == "cpu")
        for name in names:
            m.setattr(torch.Tensor, name, _trap(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "masked_select", "unique"):
            m.setattr(torch, name, _trap(name, getattr(torch, name)))
        getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

        def get(self, index):
            if _bool_mask(index) and not _allowed():
                raise HostRead("host read: boolean-mask indexing")
            return getitem(self, index)

        def put(self, index, value):
            if _bool_mask(index) and not _allowed():
                raise HostRead("host read: boolean-mask assignment")
            return setitem(self, index, value)

        m.setattr(torch.Tensor, "__getitem__", get)
        m.setattr(torch.Tensor, "__setitem__", put)
        yield


def _step(sae, opt, x, fused, sums):
    """One trainer step (sae_fast/train/trainer.py), with its device-side metric sums."""
    if fused:
        out = opt.step_fused(x, 0.5)
    else:
        out = sae(x)
        training_loss(sae, out, 0.5).backward()
        if sae.cfg.activation in UNIT_NORM_ACTIVATIONS:
            sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sae.cfg.activation in UNIT_NORM_ACTIVATIONS:
            sae.normalize_decoder_()
    for key in ("loss", "fvu", "l0", "aux_loss", "l1", "mse"):
        sums[key] = sums.get(key, 0.0) + getattr(out, key).detach().float()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_steps_read_nothing_back(monkeypatch, activation, fused):
    d, n = 24, 96
    sae = SparseAutoencoder(d, n, activation, k=4, k_aux=12, dead_tokens=50, l1_coeff=0.1, seed=0)
    sae.tokens_since_fired[::4] = 1000  # dead latents: AuxK runs (topk), fewer of them than k_aux
    opt = FusedAdam(sae, lr=1e-3) if fused else make_adam(sae.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, d, generator=g) for _ in range(3)]
    sums = {}
    with sae_fast.use_backend("cpu"), deferred_finite_checks():
        if fused:
            assert opt.fused_reason(xs[0]) is None
        with no_host_reads(monkeypatch):
            for x in xs:
                _step(sae, opt, x, fused, sums)
        raise_if_nonfinite()  # the trainer's logging step: the deferred reads happen here
    assert all(torch.isfinite(v) for v in sums.values())
    if activation == "topk":
        assert float(sums["aux_loss"]) > 0


@pytest.mark.parametrize("backend", INTERPRETED_TRITON)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka-topk"])
def test_triton_training_steps_read_nothing_back(monkeypatch, backend, activation, fused):
    """The triton backend's whole steps with the trap on, AuxK at its default k_aux = d / 2 (fp32 AuxK is
    the dead-row block): after a first step that sizes the lists (one read per shape) nothing is read back,
    and the steps equal steps whose lists were sized exactly."""
    d, n = 16, 64
    matryoshka = [8, 24, n] if activation.startswith("matryoshka") else None
    activation = activation.split("-")[-1]
    sae = SparseAutoencoder(d, n, activation, k=3, k_aux=d // 2, dead_tokens=10_000, l1_coeff=0.1, seed=0,
                            matryoshka=matryoshka)
    sae.tokens_since_fired[::4] = 20_000  # dead latents (AuxK): fewer than a few rows' k_aux
    exact = copy.deepcopy(sae)
    opts = [FusedAdam(m, lr=1e-3) if fused else make_adam(m.parameters(), 1e-3) for m in (sae, exact)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(12, d, generator=g) for _ in range(2)]
    sums = {}
    with sae_fast.use_backend(backend):
        if fused:
            assert opts[0].fused_reason(xs[0]) is None
        for x in xs:
            _step(exact, opts[1], x, fused, {})  # outside deferred checks: every list sized exactly
        with deferred_finite_checks():
            _step(sae, opts[0], xs[0], fused, sums)  # sizes the lists
            with no_host_reads(monkeypatch, backend):
                for x in xs[1:]:
                    _step(sae, opts[0], x, fused, sums)
            raise_if_nonfinite()  # the logging step: nothing overflowed
    assert all(torch.isfinite(v) for v in sums.values())
    if activation == "topk":
        assert float(sums["aux_loss"]) > 0
    for (name, p), q in zip(sae.named_parameters(), exact.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_the_trap_catches_a_host_read(monkeypatch):
    """The trap is live: the old per-step reads (a loss .item(), a boolean-mask gather) raise under it."""
    t = torch.ones(3)
    with no_host_reads(monkeypatch):
        with pytest.raises(HostRead):
            t.sum().item()
        with pytest.raises(HostRead):
            t[t > 0]
        with pytest.raises(HostRead):
            int(t.argmax())


def test_deferred_finite_check_reports_at_the_next_read():
    sae = SparseAutoencoder(8, 16, "topk", k=2, seed=0)
    opt = FusedAdam(sae, lr=1e-3)
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with sae_fast.use_backend("cpu"):
        with pytest.raises(ValueError, match="NaN or inf"):
            opt.step_fused(bad)  # not deferred: at once, before any kernel
        with pytest.raises(ValueError, match="NaN or inf in a step since the last check"):
            with deferred_finite_checks():
                opt.step_fused(torch.randn(4, 8))
                raise_if_nonfinite()  # nothing yet
                opt.step_fused(bad)


def test_dead_bound_holds_over_its_horizon_and_reads_once_per_horizon(monkeypatch):
    """SparseAutoencoder.dead_bound (AuxK's dead-row block size on the triton backend): never below the
    dead count while the counters advance, and re-read only when a quarter of dead_tokens has passed."""
    sae = SparseAutoencoder(8, 200, "topk", k=2, dead_tokens=400, seed=0)
    g = torch.Generator().manual_seed(0)
    sae.tokens_since_fired.copy_(torch.randint(0, 500, (200,), generator=g))
    reads = []
    original = SparseAutoencoder.dead_bound

    def counting(self):
        before = getattr(self, "_dead_budget", -1)
        if before < 0:
            reads.append(1)
        return original(self)

    monkeypatch.setattr(SparseAutoencoder, "dead_bound", counting)
    for _ in range(40):  # 40 steps of 10 tokens: 400 tokens, horizons of 100
        assert sae.dead_bound() >= int(sae.dead_mask.sum())
        fired = torch.randint(0, 200, (10, 2), generator=g)
        sae._update_training_state(torch.rand(10, 2, generator=g) * (torch.rand(10, 2, generator=g) < 0.2), fired)
    assert len(reads) == 4
