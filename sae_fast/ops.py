"""Differentiable sparse-autoencoder ops and the one place that chooses a backend.

Backends:
    reference  reference.py differentiated by torch autograd: dense (B, n) pre-activations; the spec.
    torch      plain-torch sparse primitives (backends/base.py), chunked over latents, any device.
    cpu        sae_fast._C, C++/OpenMP kernels for CPU tensors.
    triton     Triton kernels for CUDA tensors (CPU tensors only when forced, under TRITON_INTERPRET=1).

Default per device: cpu tensors -> cpu; cuda tensors -> triton; anything else -> torch.
Force one with ``SAE_FAST_BACKEND=<name>`` or ``with sae_fast.use_backend("<name>"):``.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import library, reference
from .backends.base import SparseBackend

try:  # newer torch; with older ones eager code decides as before, and compiling ops._gathered on a
    # data-dependent code width may fail to guard
    from torch.fx.experimental.symbolic_shapes import guard_or_false
except ImportError:
    guard_or_false = bool


# ============================================================================ registry and dispatch
class ReferenceBackend:
    """Marker: ops run reference.py directly and let autograd differentiate the dense math."""

    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return True


_BACKENDS: dict[str, object] = {}
_DEFAULT_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
# Process-wide (a plain global, not a ContextVar: torch.compile reads it and guards on its value).
_forced: str | None = None


def register_backend(backend) -> None:
    _BACKENDS[backend.name] = backend
    library._registry[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends that imported on this machine."""
    return list(_BACKENDS)


def _lookup(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available here; available backends: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the ops called inside the block (overrides ``SAE_FAST_BACKEND``)."""
    global _forced
    _lookup(name)
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


_dispatched: dict[str, library.Dispatched] = {}


def _kernels(backend) -> library.Dispatched:
    """The backend's primitives behind torch.library custom ops (what the autograd Functions call)."""
    if backend.name not in _dispatched:
        _dispatched[backend.name] = library.Dispatched(backend.name)
    return _dispatched[backend.name]


def get_backend(device: torch.device | str):
    """The backend ops will use for tensors on ``device``."""
    device = torch.device(device)
    name = _forced or os.environ.get("SAE_FAST_BACKEND") or None
    if name:
        backend = _lookup(name)
        if not backend.supports(device):
            raise ValueError(f"backend {name!r} cannot run on device {device.type!r}; "
                             f"available backends: {', '.join(_BACKENDS)}")
        return backend
    for candidate in _DEFAULT_ORDER.get(device.type, ()) + ("torch",):
        backend = _BACKENDS.get(candidate)
        if backend is not None and backend.supports(device):
            return backend
    return _BACKENDS["reference"]


register_backend(ReferenceBackend())
register_backend(SparseBackend())
try:  # The C++ module is built by setup.py; a source checkout without a build still works (torch backend).
    from .backends.cpu import CpuBackend
    register_backend(CpuBackend())
except ImportError:
    pass
try:
    from .backends.triton import TritonBackend
    register_backend(TritonBackend())
except ImportError:
    pass


# ============================================================================ input checks
_check_finite = os.environ.get("SAE_FAST_CHECK_FINITE", "1") != "0"


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/inf check on inputs on or off (one pass over x; on by default)."""
    global _check_finite
    _check_finite = bool(enabled)


def _fmt(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_master(weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """fp32 weights beside 16-bit activations: the ops read them as they are ("master weights") and
    return their gradients in fp32, so mixed-precision training needs no 16-bit copies of the weights."""
    return weight_dtype == torch.float32 and compute_dtype in _LOW_PRECISION


def _check_float(name: str, t, shape: tuple, dtype=None, device=None) -> None:
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
        also = " (or torch.float32 master weights)" if dtype in _LOW_PRECISION else ""
        raise TypeError(f"{name} must have dtype {dtype} like x{also}; got {_fmt(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; put all tensors on one device")


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of activations; got {_fmt(x)}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D (batch, d_in) tensor; got {_fmt(x)}")
    if x.shape[0] == 0:
        raise ValueError("x must have at least one row; got an empty batch")
    # Data-dependent checks would break a torch.compile graph; compiled code skips them.
    if _check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; fix the activations (or turn this check off with "
                         "sae_fast.ops.set_check_finite(False))")


def _check_encoder(x, W_enc, b_enc, b_dec) -> None:
    _check_x(x)
    d = x.shape[1]
    _check_float("W_enc", W_enc, (None, d), x.dtype, x.device)
    n = W_enc.shape[0]
    _check_float("b_enc", b_enc, (n,), x.dtype, x.device)
    _check_float("b_dec", b_dec, (d,), x.dtype, x.device)


def _check_k(name: str, k, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int; got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be between 1 and n_latents={n}; got {k}")


def _check_code(values, indices, W_dec, b_dec) -> None:
    _check_float("values", values, (None, None))
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor; got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64; got {_fmt(indices)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}; got {_fmt(indices)}")
    if indices.device != values.device:
        raise ValueError(f"indices is on {indices.device} but values is on {values.device}")
    _check_float("W_dec", W_dec, (None, None), values.dtype, values.device)
    n, d = W_dec.shape
    if b_dec is not None:
        _check_float("b_dec", b_dec, (d,), values.dtype, values.device)
    # The index range is checked inside the sparse_decode custom op, so compiled code checks it too.


# ============================================================================ autograd Functions
def _gemv_for_bias_grad(W_enc: Tensor) -> bool:
    return W_enc.device.type != "cpu"


def _sum_rows(t: Tensor) -> Tensor:
    """Column sums accumulated and returned in at least fp32 (bias gradients of 16-bit activations)."""
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32))


def _encoder_input_grad_sum(backend, dp, idx, W_enc, db_enc, dx):
    """sum_b dL/dx[b] through the encoder, = sum_{b,j} dp[b,j] W_enc[idx[b,j]] = db_enc @ W_enc.

    On GPUs the GEMV reads W_enc once instead of gathering B*k rows. Not on CPU: MKL's GEMV splits the sum
    over n by thread count, and CPU gradients must be bitwise the same for any thread count."""
    if dx is not None:
        return _sum_rows(dx)
    if db_enc is not None and _gemv_for_bias_grad(W_enc):
        return db_enc.to(W_enc.dtype) @ W_enc
    return backend.sparse_decode(dp, idx, W_enc).sum(0)


def _cast(dtype, *tensors):
    """The reference backend's view of master weights: rounded to the activations' dtype, as autocast would."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _like(grads, dtypes):
    """Gradients in their inputs' dtypes (fp32 for master weights, 16-bit for 16-bit activations)."""
    return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, dtypes))


def _gathered(W: Tensor, dtype: torch.dtype, rows: int, gathers: int) -> Tensor:
    """The decoder weights that ``gathers`` gathers of ``rows`` rows each will read. fp32 master weights beside
    16-bit codes are read as they are, unless a 16-bit copy costs fewer bytes: one pass (read 4 + write 2 per
    weight) against 2 bytes saved per weight of every gathered row, i.e. when rows * gathers > 3 n (W1, W3:
    B*k is several times n). Made inside an autograd Function, the copy is not differentiated through."""
    if not is_master(W.dtype, dtype):
        return W
    wide, narrow = W.element_size(), torch.finfo(dtype).bits // 8
    # Under torch.compile a code's width may be data-dependent (threshold lists): undecided means no copy.
    return W.to(dtype) if guard_or_false(rows * gathers * (wide - narrow) > W.shape[0] * (wide + narrow)) else W


class _Select(torch.autograd.Function):
    """Select entries of p = (x - b_dec) @ W_enc.T + b_enc without forming p; returns (pre, idx)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, backend, mode, arg):
        if mode == "topk":
            pre, idx, _, _ = backend.topk_select(x, W_enc, b_enc, b_dec, arg)
        elif mode == "threshold":
            pre, idx = backend.threshold_select(x, W_enc, b_enc, b_dec, arg)
        else:
            pre, idx = backend.batch_topk_select(x, W_enc, b_enc, b_dec, arg)
        ctx.backend = backend
        ctx.dtypes = [t.dtype for t in (x, W_enc, b_enc, b_dec)]
        ctx.save_for_backward(x, W_enc, b_dec, pre, idx)
        ctx.mark_non_differentiable(idx)
        return pre, idx

    @staticmethod
    def backward(ctx, d_pre, _):
        x, W_enc, b_dec, pre, idx = ctx.saved_tensors
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        dp = torch.where(torch.isfinite(pre), d_pre, 0.0)  # padding entries (-inf) carry no gradient
        dW_enc = db_enc = dx = db_dec = None
        if need_W or need_b_enc:
            # Gathered rows stay in x's dtype; master weights get fp32 gradients straight from the kernel.
            xc = (x - b_dec).to(x.dtype)
            dW_enc, db_enc, _ = ctx.backend.latent_backward(idx, W_enc.shape[0], dp=dp, xc=xc, grad_dtype=W_enc.dtype)
        if need_x:
            dx = ctx.backend.sparse_decode(dp, idx, W_enc)
        if need_b_dec:
            db_dec = -_encoder_input_grad_sum(ctx.backend, dp, idx, W_enc, db_enc, dx)
        grads = _like((dx, dW_enc, db_enc, db_dec), ctx.dtypes)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])), None, None, None)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, idx, W_dec, b_dec, backend):
        ctx.backend = backend
        ctx.bias_dtype = None if b_dec is None else b_dec.dtype
        ctx.weight_dtype = W_dec.dtype
        W = _gathered(W_dec, values.dtype, idx.numel(), 2 if ctx.needs_input_grad[0] else 1)
        ctx.save_for_backward(values, idx, W)
        # Backends return W's dtype; a decode over master weights comes back in the code's dtype.
        return backend.sparse_decode(values, idx, W, b_dec).to(values.dtype)

    @staticmethod
    def backward(ctx, g):
        values, idx, W = ctx.saved_tensors
        need_v, _, need_W, need_b = ctx.needs_input_grad[:4]
        g = g.contiguous()
        dv = ctx.backend.gather_dot(g, idx, W).to(values.dtype) if need_v else None
        dW_dec = (ctx.backend.latent_backward(idx, W.shape[0], v=values, g=g, grad_dtype=ctx.weight_dtype)[2]
                  if need_W else None)
        db_dec = _sum_rows(g).to(ctx.bias_dtype) if (need_b and ctx.bias_dtype) else None
        return dv, None, dW_dec, db_dec, None


class _TopKSAE(torch.autograd.Function):
    """TopK encode + decode in one node, so the backward makes one latent-sorted pass for dW_enc, db_enc
    and dW_dec together. Optionally also selects the top-k_aux dead latents (AuxK) in the same pass."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead_mask, k_aux, backend):
        pre, idx, aux_pre, aux_idx = backend.topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        values = torch.relu(pre)
        ctx.dtypes = [t.dtype for t in (x, W_enc, b_enc, W_dec, b_dec)]
        W_dec = _gathered(W_dec, x.dtype, idx.numel(), 2 if any(ctx.needs_input_grad[:5]) else 1)
        x_hat = backend.sparse_decode(values, idx, W_dec, b_dec).to(x.dtype)
        ctx.backend, ctx.n, ctx.k_aux = backend, W_enc.shape[0], k_aux
        if not k_aux:
            aux_pre = aux_idx = torch.empty(x.shape[0], 0, dtype=x.dtype, device=x.device)
            aux_idx = aux_idx.to(reference.INDEX_DTYPE)
        aux_values = torch.relu(aux_pre)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, pre, idx, values, aux_pre, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return values, idx, x_hat, aux_values, aux_idx

    @staticmethod
    def backward(ctx, d_values, _, g, d_aux_values, __):
        x, W_enc, W_dec, b_dec, pre, idx, values, aux_pre, aux_idx = ctx.saved_tensors
        backend = ctx.backend
        g = torch.zeros_like(x) if g is None else g.contiguous()
        dv = backend.gather_dot(g, idx, W_dec)
        if d_values is not None:
            dv = dv + d_values
        dp = dv * (pre > 0)
        v = values
        if ctx.k_aux and d_aux_values is not None:
            # AuxK gradients reach W_enc through the aux pre-activations; their dW_dec comes from the aux decode.
            dp = torch.cat([dp, (d_aux_values * (aux_pre > 0)).to(dp.dtype)], dim=1)
            idx = torch.cat([idx, aux_idx], dim=1)
            v = torch.cat([values, torch.zeros_like(aux_pre)], dim=1)
        need_x, need_W_enc, need_b_enc, need_W_dec, need_b_dec = ctx.needs_input_grad[:5]
        dW_enc = db_enc = dW_dec = dx = db_dec = None
        if need_W_enc or need_b_enc or need_W_dec:
            # Gathered rows stay in x's dtype; master weights get fp32 gradients straight from the kernel.
            dW_enc, db_enc, dW_dec = backend.latent_backward(
                idx, ctx.n, dp=dp, xc=(x - b_dec).to(x.dtype), v=v if need_W_dec else None, g=g,
                grad_dtype=W_enc.dtype)
        if need_x:
            dx = backend.sparse_decode(dp, idx, W_enc)
        if need_b_dec:
            db_dec = _sum_rows(g) - _encoder_input_grad_sum(backend, dp, idx, W_enc, db_enc, dx)
        grads = _like((dx, dW_enc, db_enc, dW_dec, db_dec), ctx.dtypes)
        return (*(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:5])),
                None, None, None, None)


# ============================================================================ public ops
def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK encode: ``values (B, k)`` (ReLU of the k largest pre-activations per row, descending) and
    ``indices (B, k)`` int32. Differentiable in x, W_enc, b_enc and b_dec."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    _check_k("k", k, W_enc.shape[0])
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        return reference.topk(reference.pre_activations(x, *_cast(x.dtype, W_enc, b_enc, b_dec)), k)
    pre, idx = _Select.apply(x, W_enc, b_enc, b_dec, _kernels(backend), "topk", k)
    return torch.relu(pre), idx


def relu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU encode as a sparse code (only active entries; see reference.py for the layout)."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        return reference.relu(reference.pre_activations(x, *_cast(x.dtype, W_enc, b_enc, b_dec)))
    cutoff = torch.zeros_like(b_enc)
    pre, idx = _Select.apply(x, W_enc, b_enc, b_dec, _kernels(backend), "threshold", cutoff)
    return torch.relu(pre), idx


def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, theta: Tensor,
                    bandwidth: float = 1e-3, return_l0: bool = False):
    """JumpReLU encode, ``f = p * (p > theta)``; theta (n,) > 0 gets straight-through gradients.

    With ``return_l0`` also returns the mean number of active latents per row, differentiable in theta
    through the step function's estimator (JumpReLU's sparsity loss)."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    _check_float("theta", theta, (W_enc.shape[0],), x.dtype, x.device)
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        pre = reference.pre_activations(x, *_cast(x.dtype, W_enc, b_enc, b_dec))
        theta = theta.to(x.dtype)
        values, idx = reference.jumprelu(pre, theta, bandwidth)
        l0 = reference.l0_step(pre, theta, bandwidth)
    else:
        # List every entry inside the estimator's window too, so theta's gradient sees them.
        cutoff = theta.detach() - bandwidth / 2
        pre, idx = _Select.apply(x, W_enc, b_enc, b_dec, _kernels(backend), "threshold", cutoff)
        theta_listed = gather_latents(theta, idx)
        values = reference.JumpReLUFn.apply(pre, theta_listed, bandwidth)
        l0 = reference.StepFn.apply(pre, theta_listed, bandwidth).sum(-1).mean()
    return (values, idx, l0) if return_l0 else (values, idx)


def batch_topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK encode (training): the B*k largest pre-activations of the whole batch, ReLU'd."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    _check_k("k", k, W_enc.shape[0])
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        return reference.batch_topk(reference.pre_activations(x, *_cast(x.dtype, W_enc, b_enc, b_dec)), k)
    pre, idx = _Select.apply(x, W_enc, b_enc, b_dec, _kernels(backend), "batchtopk", k)
    return torch.relu(pre), idx


def threshold_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """BatchTopK at inference: ``p * (p > threshold)`` with one global threshold."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        return reference.threshold_relu(reference.pre_activations(x, *_cast(x.dtype, W_enc, b_enc, b_dec)), threshold)
    cutoff = torch.full_like(b_enc, max(float(threshold), 0.0))
    pre, idx = _Select.apply(x, W_enc, b_enc, b_dec, _kernels(backend), "threshold", cutoff)
    return torch.relu(pre), idx


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec``; differentiable in values, W_dec, b_dec."""
    _check_code(values, indices, W_dec, b_dec)
    backend = get_backend(values.device)
    if isinstance(backend, ReferenceBackend):
        library.check_index_range(indices, W_dec.shape[0])
        return reference.sparse_decode(values, indices, *_cast(values.dtype, W_dec, b_dec))
    return _SparseDecode.apply(values.contiguous(), indices.contiguous(), W_dec, b_dec, _kernels(backend))


def _segment_sum(src: Tensor, idx: Tensor, n: int) -> Tensor:
    """out[i] = sum of src where idx == i, (n,) float64, in a fixed order: a stable sort and float64
    prefix sums (float32 on MPS). Not index_add_ or an indexing backward: on CUDA those accumulate with atomics (order
    varies run to run) or serialise repeated indices (22 ms of a 25 ms ReLU+L1 step at W4 on an H100)."""
    flat = idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    acc = torch.float32 if src.device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.cat([src.new_zeros(1, dtype=acc), src.reshape(-1)[order].to(acc).cumsum(0)])
    bounds = torch.searchsorted(flat[order], torch.arange(n + 1, device=idx.device))
    return sums[bounds[1:]] - sums[bounds[:-1]]


class _GatherLatents(torch.autograd.Function):
    """table[idx] for a per-latent table (n,); its gradient is a deterministic segment sum."""

    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.n, ctx.dtype = table.shape[0], table.dtype
        return table[idx.long()]

    @staticmethod
    def backward(ctx, g: Tensor):
        (idx,) = ctx.saved_tensors
        return _segment_sum(g, idx, ctx.n).to(ctx.dtype), None


def gather_latents(table: Tensor, indices: Tensor) -> Tensor:
    """``table[indices]`` for a per-latent table (n,) such as decoder norms or JumpReLU thresholds, with a
    deterministic, fast backward (see ``_segment_sum``)."""
    if isinstance(get_backend(table.device), ReferenceBackend):
        return table[indices.long()]
    return _GatherLatents.apply(table, indices)


def decoder_norm_l1(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``reference.l1_penalty``: ``sum_i f_i * ||W_dec_i||`` per row, averaged over rows, in float32."""
    if isinstance(get_backend(values.device), ReferenceBackend):
        return reference.l1_penalty(values.float(), indices, W_dec.float())
    return (values.float() * gather_latents(W_dec.float().norm(dim=-1), indices)).sum(-1).mean()


class TopKSAEResult(NamedTuple):
    values: Tensor       # (B, k) ReLU'd top-k pre-activations, descending
    indices: Tensor      # (B, k) int32
    x_hat: Tensor        # (B, d) reconstruction
    aux_values: Tensor   # (B, k_aux) top-k_aux over dead latents (AuxK), or (B, 0)
    aux_indices: Tensor  # (B, k_aux) int32, or (B, 0)


def topk_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
             dead_mask: Tensor | None = None, k_aux: int = 0) -> TopKSAEResult:
    """A whole TopK SAE forward in one differentiable op (one fused backward pass on fused backends).

    With ``dead_mask`` (n,) bool and ``k_aux`` > 0 it also returns the top-min(k_aux, #dead) dead latents
    per row, for the AuxK loss."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    n = W_enc.shape[0]
    _check_float("W_dec", W_dec, (n, x.shape[1]), x.dtype, x.device)
    _check_k("k", k, n)
    if dead_mask is not None and k_aux:
        if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool or dead_mask.shape != (n,):
            raise TypeError(f"dead_mask must be a bool tensor of shape ({n},)")
        k_aux = min(int(k_aux), int(dead_mask.sum()))
    else:
        k_aux = 0
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        W_enc, b_enc, W_dec, b_dec = _cast(x.dtype, W_enc, b_enc, W_dec, b_dec)
        pre = reference.pre_activations(x, W_enc, b_enc, b_dec)
        values, idx = reference.topk(pre, k)
        x_hat = reference.sparse_decode(values, idx, W_dec, b_dec)
        if k_aux:
            aux_values, aux_idx = reference.dead_topk(pre, dead_mask.to(x.device), k_aux)
        else:
            aux_values = x.new_zeros(x.shape[0], 0)
            aux_idx = torch.zeros(x.shape[0], 0, dtype=reference.INDEX_DTYPE, device=x.device)
        return TopKSAEResult(values, idx, x_hat, aux_values, aux_idx)
    mask = dead_mask.to(x.device) if k_aux else None
    return TopKSAEResult(*_TopKSAE.apply(x, W_enc, b_enc, W_dec, b_dec, k, mask, k_aux, _kernels(backend)))
