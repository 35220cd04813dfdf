"""No crash from a public entry point: out-of-range indices and k raise a ValueError, never segfault.

Each reproducer runs in a subprocess, so a crash fails the test instead of killing the test run."""
import subprocess
import sys
import textwrap

import pytest
from helpers import CPU_BACKENDS

SETUP = """
import torch, sae_fast
from sae_fast import custom_ops
b = sae_fast.get_backend("cpu") if BACKEND == "cpu" else sae_fast.dispatch.lookup_backend(BACKEND)
bad = torch.full((4, 2), BAD, dtype=torch.int32)
W = torch.randn(64, 16)
"""

CALLS = {
    "sparse_decode": "b.sparse_decode(torch.ones(4, 2), bad, W)",
    "gather_dot": "b.gather_dot(torch.randn(4, 16), bad, W)",
    "latent_backward_enc": "b.latent_backward(bad, 64, dp=torch.ones(4, 2), xc=torch.randn(4, 16))",
    "latent_backward_dec": "b.latent_backward(bad, 64, v=torch.ones(4, 2), g=torch.randn(4, 16))",
    "op_gather_dot": "custom_ops.gather_dot(BACKEND, torch.randn(4, 16), bad, W)",
    "op_latent_backward": "custom_ops.latent_backward(BACKEND, bad, 64, v=torch.ones(4, 2), g=torch.randn(4, 16))",
    "op_sparse_decode": "custom_ops.sparse_decode(BACKEND, torch.ones(4, 2), bad, W)",
}


def _run(backend, bad, calls):
    """Each call in turn in one subprocess; prints one line per call: its name and RAISED/NO ERROR."""
    body = "".join(textwrap.dedent(f"""
    try:
        {call}
    except (ValueError, IndexError, RuntimeError) as e:
        print({name!r}, "RAISED", type(e).__name__, str(e).splitlines()[0], flush=True)
    else:
        print({name!r}, "NO ERROR", flush=True)
    """) for name, call in calls.items())
    code = f"BACKEND = {backend!r}\nBAD = {bad}\n" + SETUP + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [10 ** 8, -1, 64])
def test_out_of_range_indices_raise(backend, bad):
    r = _run(backend, bad, CALLS)
    assert r.returncode == 0, f"crashed (rc {r.returncode}) after:\n{r.stdout}\n{r.stderr[-300:]}"
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert sorted(lines) == sorted(CALLS), r.stdout
    for name, line in lines.items():
        assert line.startswith("RAISED"), (name, line)
        if backend == "cpu":
            assert line.startswith("RAISED ValueError") and "indices" in line, (name, line)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_select_k_above_n_raises(backend):
    r = _run(backend, 0, {"topk": "b.topk_select(torch.randn(3, 16), W, torch.zeros(64), torch.zeros(16), 100)"})
    assert r.returncode == 0, r.stderr[-500:]
    assert "RAISED ValueError" in r.stdout and "k" in r.stdout, r.stdout
