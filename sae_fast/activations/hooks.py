"""Read activations out of any ``nn.Module`` by module name: forward hooks, glob patterns, several at once.

    acts = capture(model, "encoder.layer.*", input_ids=ids)     # {"encoder.layer.0": (B, T, d), ...}

The forward pass stops as soon as every hooked module has produced its output (the rest of the model is
never run), and nothing is differentiated through the model.

For transcoders (``transcode=True``) both ends of each module come out of the one forward pass, named as
sparsify names them (the hookpoint is the module): ``acts[name]`` is the module's input (its first
argument) and ``acts[name + TARGET_SUFFIX]`` its output.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

TARGET_SUFFIX = ":out"
"""A transcoder's target (the module's output) is stored under ``<module name>:out``; the name itself holds
the module's input, what the transcoder reads."""


def module_input(args, kwargs, layer: str = "?") -> Tensor:
    """The activation a module reads: its first positional argument, or its first tensor keyword argument
    (``hidden_states=...``)."""
    for v in list(args) + list((kwargs or {}).values()):
        if isinstance(v, Tensor):
            return first_tensor(v, layer)
    raise TypeError(f"layer {layer!r} was called with no tensor argument: nothing for a transcoder to read")


class _AllCaptured(Exception):
    """Raised inside the last hook to stop the forward pass early."""


def _split_patterns(layers) -> list[str]:
    if isinstance(layers, str):
        layers = layers.split(",")
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a module name, a comma-separated string or a list of them; got {layers!r}")
    out = [p.strip() for p in layers if isinstance(p, str) and p.strip()]
    if not out:
        raise ValueError(f"layers must name at least one module; got {layers!r}")
    return out


def _glob_regex(pattern: str) -> re.Pattern:
    """Module-name glob: ``*`` and ``?`` stay inside one dotted part, ``**`` crosses dots, ``[0-3]`` is a set."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        close = pattern.find("]", i + 2) if c == "[" else -1
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c in "*?":
            out.append(r"[^.]*" if c == "*" else r"[^.]")
            i += 1
        elif close > 0:
            body = pattern[i + 1:close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def resolve_layers(model: nn.Module, layers) -> list[str]:
    """Module names matching ``layers`` (names or glob patterns like ``"h.*"``, a list or comma-separated;
    ``*`` matches within one dotted part, so ``"h.*"`` is the blocks and not their submodules; ``**`` crosses dots),
    in the model's own order. A leading ``<base_model_prefix>.`` (``model.``, ``transformer.``) is accepted
    too, so names written for a ``...ForCausalLM`` work on the base model, and the other way round: a
    base-model name (``h.6``, as ``sae-fast train`` records it) works on the wrapper. Unknown names raise a
    ``ValueError`` listing the closest module names."""
    names = [n for n, _ in model.named_modules() if n]
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: list[str] = []
    for pattern in _split_patterns(layers):
        candidates = [pattern]
        if prefix and pattern.startswith(prefix + "."):
            candidates.append(pattern[len(prefix) + 1:])
        elif prefix and hasattr(model, prefix):  # a base-model name on its ...ForCausalLM wrapper
            candidates.append(f"{prefix}.{pattern}")
        hits: list[str] = []
        for cand in candidates:
            regex = _glob_regex(cand)
            hits = [n for n in names if regex.match(n)]
            if hits:
                break
        if not hits:
            close = sorted(difflib.get_close_matches(pattern, names, n=6, cutoff=0.5), key=names.index)
            if not close:  # fall back to the repeated blocks, the usual hook points
                close = [n for n in names if n.count(".") <= 2 and n.rsplit(".", 1)[-1].isdigit()][:6]
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"layer {pattern!r} matches no module of {type(model).__name__}{hint}")
        found += [h for h in hits if h not in found]
    order = {n: i for i, n in enumerate(names)}
    return sorted(found, key=order.__getitem__)


def middle_layer(model: nn.Module) -> str:
    """Name of the middle block of the model's longest ``nn.ModuleList`` (its stack of layers)."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers; name the module with --layer")
    size, name = max(lists, key=lambda t: t[0])
    return f"{name}.{size // 2}" if name else str(size // 2)


def first_tensor(output, layer: str = "?") -> Tensor:
    """The activation tensor in a module's output: the tensor itself, or the first element of a tuple, list
    or ``ModelOutput`` (transformer blocks return ``(hidden_states, ...)`` in some versions)."""
    out = output
    while isinstance(out, (tuple, list)) and len(out):
        out = out[0]
    if isinstance(out, dict) and out:  # ModelOutput is a dict too; its first field is the hidden state
        out = next(iter(out.values()))
    if not isinstance(out, Tensor) or not out.is_floating_point():
        kind = f"tensor of dtype {out.dtype}" if isinstance(out, Tensor) else type(output).__name__
        raise TypeError(f"layer {layer!r} returns a {kind}, not a floating-point activation tensor; "
                        "hook a module whose output is the hidden state (e.g. a whole transformer block)")
    return out


class LayerCapture:
    """Context manager: while active, the first output of each named module is stored in ``.outputs``.

    With ``stop_early`` the forward pass is aborted once all of them have fired; call the model through
    ``run(...)`` so that the abort is caught."""

    def __init__(self, model: nn.Module, layers, stop_early: bool = True, transcode: bool = False):
        self.model = model
        self.names = resolve_layers(model, layers)
        self.stop_early = stop_early
        self.transcode = transcode
        # What run() returns: each name, and with transcode each name's target too (see the module docstring).
        self.keys = [k for n in self.names for k in ((n, n + TARGET_SUFFIX) if transcode else (n,))]
        self.outputs: dict[str, Tensor] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            if name in self.outputs:  # a module called twice: keep its first output
                return
            if self.transcode:
                self.outputs[name] = module_input(args, kwargs, name).detach()
                self.outputs[name + TARGET_SUFFIX] = first_tensor(output, name).detach()
            else:
                self.outputs[name] = first_tensor(output, name).detach()
            if self.stop_early and len(self.outputs) == len(self.keys):
                raise _AllCaptured
        return hook

    def __enter__(self):
        modules = dict(self.model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n), with_kwargs=True) for n in self.names]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def run(self, *args, **kwargs) -> dict[str, Tensor]:
        """Call the model on the inputs (no gradients) and return {layer name: output}."""
        self.outputs = {}
        try:
            with torch.no_grad():
                self.model(*args, **kwargs)
        except _AllCaptured:
            pass
        missing = [n for n in self.keys if n not in self.outputs]
        if missing:
            raise ValueError(f"layers {missing} did not run in {type(self.model).__name__}'s forward pass")
        return self.outputs


def capture(model: nn.Module, layers, *args, stop_early: bool = True, transcode: bool = False,
            **kwargs) -> dict[str, Tensor]:
    """Run ``model(*args, **kwargs)`` once without gradients and return the outputs of the modules named
    by ``layers`` (names or glob patterns); with ``transcode`` their inputs too (the module docstring).
    Works for any ``nn.Module``: text, vision, anything."""
    with LayerCapture(model, layers, stop_early, transcode) as cap:
        return cap.run(*args, **kwargs)
