"""The one backend registry, and the one place that chooses a backend for a device.

Backends:
    reference  reference.py differentiated by torch autograd: dense (B, n) pre-activations; the spec.
    torch      plain-torch sparse primitives (backends/base.py), chunked over latents, any device.
    cpu        sae_fast._C, C++/OpenMP kernels for CPU tensors.
    triton     Triton kernels for CUDA tensors (CPU tensors only when forced, under TRITON_INTERPRET=1).

Default per device: cpu tensors -> cpu; cuda tensors -> triton; anything else -> torch.
Force one with ``SAE_FAST_BACKEND=<name>`` or ``with sae_fast.use_backend("<name>"):``.
The torch.library custom ops (custom_ops.py) look their backend up here by name.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .backends.base import SparseBackend


class ReferenceBackend:
    """Marker: ops run reference.py directly and let autograd differentiate the dense math."""

    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return True

    def runs_on(self) -> str:
        return "any device (reference.py's dense math, the spec)"


_BACKENDS: dict[str, object] = {}
_MISSING: dict[str, str] = {}  # name -> why it did not import here
_DEFAULT_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
# Process-wide (a plain global, not a ContextVar: torch.compile reads it and guards on its value).
_forced: str | None = None


def register_backend(backend) -> None:
    """Make ``backend`` (a ``SparseBackend``, named by its ``name``) available to ops and the custom ops."""
    _BACKENDS[backend.name] = backend
    _MISSING.pop(backend.name, None)


def available_backends() -> list[str]:
    """Names of the backends that imported on this machine."""
    return list(_BACKENDS)


def unavailable_backends() -> dict[str, str]:
    """Backends this package has but that did not import here, with the reason."""
    return dict(_MISSING)


def lookup_backend(name: str):
    """The registered backend called ``name``; a clear error listing the others if there is none."""
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available here; available backends: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def describe_backends() -> dict[str, str]:
    """For every backend this package has: which tensors it runs on here, or why it is not available."""
    described = {name: backend.runs_on() for name, backend in _BACKENDS.items()}
    return {**described, **{name: f"not available: {why}" for name, why in _MISSING.items()}}


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the ops called inside the block (overrides ``SAE_FAST_BACKEND``)."""
    global _forced
    lookup_backend(name)
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def get_backend(device: torch.device | str):
    """The backend ops will use for tensors on ``device``."""
    device = torch.device(device)
    name = _forced or os.environ.get("SAE_FAST_BACKEND") or None
    if name:
        backend = lookup_backend(name)
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
except ImportError as err:
    _MISSING["cpu"] = f"sae_fast._C is not built ({err}); pip install -e . builds it"
try:
    from .backends.triton import TritonBackend
    register_backend(TritonBackend())
except ImportError as err:
    _MISSING["triton"] = str(err)
