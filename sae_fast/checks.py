"""Input checks of the public ops: one-line errors naming the bad argument, before any kernel runs."""
from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch
from torch import Tensor

_check_finite = os.environ.get("SAE_FAST_CHECK_FINITE", "1") != "0"


# While deferring (deferred_finite_checks): (device, message) -> a bool tensor, "held at every step so far";
# and the callables to run at the next read (backends learning list capacities from device-side needs).
_deferred: dict | None = None
_readers: list = []

_NONFINITE = ("x contained NaN or inf in a step since the last check; fix the activations (or turn this check "
              "off with sae_fast.ops.set_check_finite(False))")


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/inf check on inputs on or off (one pass over x; on by default)."""
    global _check_finite
    _check_finite = bool(enabled)


@contextlib.contextmanager
def deferred_finite_checks():
    """Inside, the ops' NaN/inf check on x is kept on x's device instead of read at once (a read would
    stall an accelerator's queue every op), and so are the triton backend's checks that a fixed-capacity
    list held every entry; ``raise_if_nonfinite()`` reads them, and so does leaving the block. The trainer
    reads them at its logging steps."""
    global _deferred
    outer, _deferred = _deferred, {}
    try:
        yield
        raise_if_nonfinite()
    finally:
        _deferred = outer


def deferring() -> bool:
    """Whether device-side checks are being kept for the next read (inside deferred_finite_checks)."""
    return _deferred is not None


def defer_check(ok: Tensor, message: str, reader=None) -> None:
    """Inside deferred_finite_checks: the next read raises ValueError(message) unless ``ok`` (a 0-d bool
    tensor) and every earlier ``ok`` of the same message held; ``reader`` (once per read) runs first."""
    key = (ok.device, message)
    seen = _deferred.get(key)
    _deferred[key] = ok if seen is None else seen & ok
    if reader is not None and reader not in _readers:
        _readers.append(reader)


_dead_bound: list = []  # the innermost dead_bound() block's bound


@contextlib.contextmanager
def dead_bound(bound):
    """Inside, a backend that needs one may call ``bound()`` for an upper bound on the dead latents of the
    AuxK calls it gets (SparseAutoencoder.dead_bound: mostly no host read); None: no bound known."""
    _dead_bound.append(bound)
    try:
        yield
    finally:
        _dead_bound.pop()


def current_dead_bound() -> int | None:
    return _dead_bound[-1]() if _dead_bound and _dead_bound[-1] is not None else None


def raise_if_nonfinite() -> None:
    """Raise the ValueError that a deferred check would have raised, if any since the last call failed (one
    host read per device and check): NaN or inf in x, or a list that overflowed its capacity."""
    readers = list(_readers)
    _readers.clear()
    for fn in readers:
        fn()
    if not _deferred:
        return
    flags = list(_deferred.items())
    _deferred.clear()
    for (_, message), ok in flags:
        if not bool(ok):
            raise ValueError(message)


def _fmt(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_master(weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """fp32 weights beside 16-bit activations: the ops read them as they are ("master weights") and
    return their gradients in fp32, so mixed-precision training needs no 16-bit copies of the weights."""
    return weight_dtype == torch.float32 and compute_dtype in LOW_PRECISION


def check_float(name: str, t, shape: tuple, dtype=None, device=None) -> None:
    """``shape`` entries are ints, or None for 'any size'. A weight must have ``dtype`` (x's), or be a
    float32 master weight when ``dtype`` is 16-bit."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {_fmt(t)}")
    want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {want}; got {_fmt(t)}")
    if dtype is not None and t.dtype != dtype and not is_master(t.dtype, dtype):
        also = " (or torch.float32 master weights)" if dtype in LOW_PRECISION else ""
        raise TypeError(f"{name} must have dtype {dtype} like x{also}; got {_fmt(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; put all tensors on one device")


def check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of activations; got {_fmt(x)}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D (batch, d_in) tensor; got {_fmt(x)}")
    if x.device.type == "meta":
        raise ValueError("x is on the meta device, which holds shapes but no values; the ops need real tensors "
                         "(cpu or cuda)")
    if x.shape[0] == 0:
        raise ValueError("x must have at least one row; got an empty batch")
    # Data-dependent checks would break a torch.compile graph; compiled code skips them.
    if not _check_finite or torch.compiler.is_compiling():
        return
    if _deferred is not None:
        defer_check(torch.isfinite(x).all(), _NONFINITE)
    elif not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; fix the activations (or turn this check off with "
                         "sae_fast.ops.set_check_finite(False))")


def check_encoder(x, W_enc, b_enc, b_dec) -> None:
    check_x(x)
    d = x.shape[1]
    check_float("W_enc", W_enc, (None, d), x.dtype, x.device)
    n = W_enc.shape[0]
    if n == 0:
        raise ValueError(f"W_enc must have at least one latent (row); got {_fmt(W_enc)}")
    check_float("b_enc", b_enc, (n,), x.dtype, x.device)
    check_float("b_dec", b_dec, (d,), x.dtype, x.device)


def check_count(name: str, k) -> int:
    """An integer argument (numpy integers too: they are integers; bool and 2.5 are not), as an int."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(k).__name__} {k!r}")
    return int(k)


def check_number(name: str, v) -> float:
    """A finite real number (a threshold, a coefficient), as a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite number; got {type(v).__name__} {v!r}")
    return float(v)


def check_k(name: str, k, n: int) -> None:
    k = check_count(name, k)
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be between 1 and n_latents={n}; got {k}")


def check_dead_mask(dead_mask, n: int) -> None:
    if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool or dead_mask.shape != (n,):
        raise TypeError(f"dead_mask must be a bool tensor of shape ({n},)")


def check_code(values, indices, W_dec, b_dec) -> None:
    check_float("values", values, (None, None))
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor; got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64; got {_fmt(indices)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}; got {_fmt(indices)}")
    if indices.device != values.device:
        raise ValueError(f"indices is on {indices.device} but values is on {values.device}")
    check_float("W_dec", W_dec, (None, None), values.dtype, values.device)
    n, d = W_dec.shape
    if b_dec is not None:
        check_float("b_dec", b_dec, (d,), values.dtype, values.device)
    # The index range is checked by every backend's sparse_decode (inside the custom op), so compiled code
    # checks it too.


def check_index_range(idx: Tensor, n: int) -> None:
    """A kernel must never read out of bounds: indices from callers are checked before any kernel runs."""
    if idx.numel():
        lo, hi = (int(t) for t in torch.aminmax(idx))
        if lo < 0 or hi >= n:
            raise ValueError(f"indices must lie in [0, n_latents={n}); got values in [{lo}, {hi}]")


def check_indices(idx: Tensor, n: int) -> None:
    """The torch and triton backends' guard before a kernel indexes rows with ``idx``: a ValueError on CPU;
    on an accelerator a device-side assert, so the check costs no host sync. (The cpu backend's kernels
    count bad indices themselves and raise, with no host read of a tensor.)"""
    if idx.device.type == "cpu" and not deferring():  # deferring: as on an accelerator (no host read)
        check_index_range(idx, n)
    elif idx.numel():
        torch._assert_async(((idx >= 0) & (idx < n)).all())


def check_select_k(k, n: int, k_aux: int = 0) -> None:
    """The backends' guard on the number of latents to select (a kernel would pad or overrun)."""
    check_k("k", k, n)
    if k_aux:
        check_k("k_aux", k_aux, n)


def check_widths(widths, n_latents: int, activation: str | None = None) -> list[int]:
    """``matryoshka`` as a list of ints: cumulative prefix widths, strictly increasing, the last = n_latents
    (and, given an SAE's ``activation``, that it is topk or batchtopk)."""
    if activation is not None and activation not in ("topk", "batchtopk"):
        raise ValueError(f"matryoshka needs activation 'topk' or 'batchtopk'; got {activation!r}")
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise TypeError(f"matryoshka must be a list of prefix widths; got {type(widths).__name__} {widths!r}")
    widths = list(widths)
    if not widths or any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in widths):
        raise TypeError(f"matryoshka must be a non-empty list of ints (prefix widths); got {widths!r}")
    widths = [int(m) for m in widths]
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka prefix widths must be positive and strictly increasing; got {widths}")
    if widths[-1] != n_latents:
        raise ValueError(f"matryoshka's last prefix width must be n_latents={n_latents} (cumulative widths, "
                         f"SAELens' convention); got {widths}")
    return widths
