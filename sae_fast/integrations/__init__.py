"""Drop-in speed for SAELens and sparsify: one call swaps sae-fast's fused ops into their SAE classes.

    import sae_fast.integrations
    sae_fast.integrations.patch()        # whichever of SAELens and sparsify is installed
    # ... your SAELens or sparsify training script, unchanged ...
    sae_fast.integrations.unpatch()      # or: with sae_fast.integrations.patched(): ...

One library only: ``sae_fast.integrations.sparsify.patch()`` or ``sae_fast.integrations.sae_lens.patch()``
(each also has ``unpatch()``, ``patched()`` and ``is_patched()``). ``patch()`` returns what it patched and
what it left alone (``print()`` it, or pass ``verbose=True``); their modules' docstrings say exactly what
runs on sae-fast and what keeps the library's own code. Configs, trainers and saved files are the
libraries' own, unchanged: an SAE trained patched loads in the unpatched library.
"""
from __future__ import annotations

import contextlib

from . import sae_lens, sparsify
from ._patching import PatchReport

_LIBRARIES = {"sae_lens": sae_lens, "sparsify": sparsify}

__all__ = ["patch", "unpatch", "patched", "PatchReport", "sae_lens", "sparsify"]


def _chosen(sae_lens: bool, sparsify: bool) -> dict:
    wanted = {"sae_lens": sae_lens, "sparsify": sparsify}
    return {name: module for name, module in _LIBRARIES.items() if wanted[name]}


def patch(sae_lens: bool = True, sparsify: bool = True, verbose: bool = False) -> dict[str, PatchReport]:
    """Patch every chosen library that is installed (a missing one is reported as such, not an error).
    Returns ``{"sae_lens": PatchReport, "sparsify": PatchReport}``."""
    return {name: module.patch(verbose) for name, module in _chosen(sae_lens, sparsify).items()}


def unpatch(sae_lens: bool = True, sparsify: bool = True) -> None:
    """Restore the chosen libraries' original methods exactly."""
    for module in _chosen(sae_lens, sparsify).values():
        module.unpatch()


@contextlib.contextmanager
def patched(sae_lens: bool = True, sparsify: bool = True, verbose: bool = False):
    """Patched inside the block; each library is unpatched on exit unless it was patched before."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(module.patched(verbose))
               for name, module in _chosen(sae_lens, sparsify).items()}
