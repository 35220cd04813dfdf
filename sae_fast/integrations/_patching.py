"""What both integrations share: swapping class attributes in and out exactly, version and signature
checks (one warning per library), the report of what was patched, and small tensor helpers."""
from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .. import ops


# ============================================================================ the report
@dataclass
class PatchReport:
    """What ``patch()`` changed in one library. ``print(report)`` lists it."""

    library: str
    version: str | None
    tested_versions: tuple[str, ...]
    patched: list[str] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    @property
    def installed(self) -> bool:
        return self.version is not None

    @property
    def tested(self) -> bool:
        return self.version is not None and any(_same_release(self.version, t) for t in self.tested_versions)

    def __str__(self) -> str:
        if not self.installed:
            return f"{self.library}: not installed, nothing patched"
        tested = "tested" if self.tested else f"untested; tested with {', '.join(self.tested_versions)}"
        lines = [f"{self.library} {self.version} ({tested}): {len(self.patched)} methods run on sae-fast's ops"]
        lines += [f"  patched      {name}" for name in self.patched]
        lines += [f"  left alone   {what}: {why}" for what, why in self.left_alone]
        return "\n".join(lines)


def _same_release(version: str, tested: str) -> bool:
    """'6.54.12' matches '6.54' (a tested minor release) and '1.3.3' matches '1.3.3'."""
    return version == tested or version.startswith(tested + ".")


# ============================================================================ targets and patching
@dataclass(frozen=True)
class Target:
    """Replace ``owner.name`` by ``make(original)``, where ``original`` is what ``owner.name`` resolves to now
    (possibly inherited). ``params`` are the parameter names the replacement was written against."""

    owner: type
    name: str
    make: Callable[[Callable], Callable]
    params: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.owner.__name__}.{self.name}"


_MISSING = object()


class Patcher:
    """Patch state of one library: its targets are found lazily (the library imported on first use)."""

    def __init__(self, library: str, distribution: str, tested: tuple[str, ...],
                 targets: Callable[[], tuple[list[Target], list[tuple[str, str]]]]):
        self.library, self.distribution, self.tested = library, distribution, tested
        self._targets = targets
        self._saved: list[tuple[type, str, object]] = []   # (owner, name, own attribute or _MISSING)
        self._report: PatchReport | None = None
        self._warned = False
        self._version = _MISSING
        self._found = None
        self._made: dict = {}  # (owner, name) -> (original, why it cannot be patched or None, replacement)

    @property
    def is_patched(self) -> bool:
        return bool(self._saved)

    def version(self) -> str | None:
        if self._version is _MISSING:
            try:
                self._version = importlib.metadata.version(self.distribution)
            except importlib.metadata.PackageNotFoundError:
                self._version = None
        return self._version

    def targets(self) -> tuple[list[Target], list[tuple[str, str]]]:
        """Found once per process (patch/unpatch cycles, as in ``patched()`` around each call, stay cheap)."""
        if self._found is None:
            self._found = self._targets()
        targets, left = self._found
        return targets, list(left)

    def patch(self, verbose: bool = False) -> PatchReport:
        if self._report is not None and self.is_patched:
            return self._report
        report = PatchReport(self.library, self.version(), self.tested)
        if report.installed:
            if not report.tested and not self._warned:
                self._warned = True
                warnings.warn(f"sae_fast.integrations: {self.library} {report.version} is untested (tested: "
                              f"{', '.join(self.tested)}); patching only the methods whose signatures match",
                              stacklevel=3)
            targets, report.left_alone = self.targets()
            # Resolve every original first: a subclass's inherited method is the library's, not a replacement.
            originals = [getattr(t.owner, t.name, None) for t in targets]
            for t, original in zip(targets, originals):
                why, replacement = self._replacement(t, original)
                if why:
                    report.left_alone.append((t.label, why))
                    continue
                self._saved.append((t.owner, t.name, t.owner.__dict__.get(t.name, _MISSING)))
                setattr(t.owner, t.name, replacement)
                report.patched.append(t.label)
        self._report = report
        if verbose:
            print(report)
        return report

    def _replacement(self, t: Target, original) -> tuple[str | None, Callable | None]:
        """(why ``original`` cannot be replaced, None) or (None, its replacement); made once per original."""
        key = (t.owner, t.name)
        if key not in self._made or self._made[key][0] is not original:
            why = _mismatch(original, t.params)
            replacement = None if why else t.make(original)
            if replacement is not None:
                replacement.__sae_fast_original__ = original
            self._made[key] = (original, why, replacement)
        return self._made[key][1:]

    def unpatch(self) -> None:
        """Put back every attribute exactly as it was (an inherited method is inherited again)."""
        while self._saved:
            owner, name, own = self._saved.pop()
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._report = None

    @contextlib.contextmanager
    def patched(self, verbose: bool = False):
        """Patched inside the block; on exit, unpatched again unless it was patched before."""
        already = self.is_patched
        report = self.patch(verbose)
        try:
            yield report
        finally:
            if not already:
                self.unpatch()


def _mismatch(original, params: tuple[str, ...]) -> str | None:
    if original is None:
        return "not found in this version"
    try:
        found = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return "its signature cannot be read"
    if found != params:
        return f"signature changed: expected ({', '.join(params)}), found ({', '.join(found)})"
    return None


def has_hooks(modules) -> bool:
    """Any forward/backward hook on these modules (a TransformerLens HookPoint in use, say)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


# ============================================================================ tensor helpers
def compute_dtype(x: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """autocast's dtype where it is on for x's device, else the weights' own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight_dtype


def operand(param: Tensor, dtype: torch.dtype) -> Tensor:
    """A weight as the ops take it beside activations of ``dtype``: fp32 master weights stay as they are
    (their gradients come back in fp32), anything else is cast."""
    return param if ops.is_master(param.dtype, dtype) else param.to(dtype)


def _primitives(device: torch.device):
    backend = ops.get_backend(device)
    if not hasattr(backend, "gather_dot"):  # the reference marker: plain torch primitives
        from ..backends.base import SparseBackend
        backend = SparseBackend()
    return backend


class _GatherDot(torch.autograd.Function):
    """out[b, j] = xc[b] . W[idx[b, j]] on the backend's gather and latent-gradient kernels (the adjoint of a
    sparse decode), so pre-activations of a few listed latents cost B*K*d, not a dense GEMM."""

    @staticmethod
    def forward(ctx, xc, W, idx):
        backend = _primitives(xc.device)
        ctx.backend = backend
        ctx.save_for_backward(xc, W, idx)
        return backend.gather_dot(xc.contiguous(), idx.contiguous(), W).to(xc.dtype)

    @staticmethod
    def backward(ctx, g):
        xc, W, idx = ctx.saved_tensors
        g = g.contiguous()
        dxc = ctx.backend.sparse_decode(g, idx, W).to(xc.dtype) if ctx.needs_input_grad[0] else None
        dW = (ctx.backend.latent_backward(idx, W.shape[0], dp=g, xc=xc.contiguous(), grad_dtype=W.dtype)[0]
              if ctx.needs_input_grad[1] else None)
        return dxc, dW, None


def pre_at(xc: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """Pre-activations ``xc @ W_enc[idx].T + b_enc[idx]`` (B, K) of the listed latents only, differentiable."""
    return _GatherDot.apply(xc, W_enc, idx) + ops.gather_latents(b_enc, idx).to(xc.dtype)


def active_coo(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """The nonzero entries of a sparse code as a (B, n) sparse COO tensor (no gradient)."""
    values, idx = values.detach(), idx.long()
    rows, slots = (values != 0).nonzero(as_tuple=True)
    return torch.sparse_coo_tensor(torch.stack([rows, idx[rows, slots]]), values[rows, slots],
                                   (values.shape[0], n), check_invariants=False)
