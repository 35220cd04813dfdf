"""Static checks of the Triton kernels, no GPU: every launch the launchers make for the DESIGN.md
workloads W1-W4 (bf16 and fp32) is compiled for sm_80 and sm_90 and must not spill, must fit the
target's shared memory and an SM, and the GEMM kernels must use tensor cores (HMMA/HGMMA).

The compiles run in a subprocess with the interpreter off (this process may have Triton in interpreter
mode, which is fixed at import), with Triton's cache in a temporary directory. The checker is
benchmarks/triton_resources.py (a development tool, outside the package).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from helpers import BENCHMARKS, load_script  # noqa: E402

resources = load_script("triton_resources")


def _run(args, tmp_path, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_HOME=str(tmp_path / "triton-home"))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    out = tmp / "rows.json"
    proc = _run([str(BENCHMARKS / "triton_resources.py"), "--json", str(out), "--jobs", "2"], tmp, timeout=900)
    if not out.exists():
        pytest.fail(f"the static check did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("workload", list(resources.WORKLOADS))
@pytest.mark.parametrize("cap", list(resources.TARGETS))
def test_launches_compile_without_spills_and_use_tensor_cores(rows, workload, cap):
    mine = [r for r in rows if r["workload"] == workload and r["cap"] == cap]
    assert {r["dtype"] for r in mine} == set(resources.DTYPES)
    kernels = {r["kernel"] for r in mine}
    assert kernels & set(resources.GEMM_KERNELS), "no GEMM kernel among the launches"
    assert "_sparse_decode_kernel" in kernels and "_latent_backward_kernel" in kernels
    failures = [f"{r['kernel']} [{r['config']}] for {r['target']}, {workload} {r['dtype']}: {'; '.join(r['problems'])}"
                for r in mine if r["problems"]]
    assert not failures, "\n".join(failures)


def test_gemm_kernels_report_their_tensor_core_instructions(rows):
    for r in rows:
        if resources.is_gemm(r):
            assert (r["hgmma"] if r["cap"] >= 90 else r["hmma"]) > 0, r


_SPILLING = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import triton_resources as R
from sae_fast.kernels import encoder_common as C, topk_encoder as T
x = torch.empty(4096, 768, dtype=torch.bfloat16, device="meta")
W = torch.empty(32768, 768, dtype=torch.bfloat16, device="meta")
cfg = C.EncoderConfig(128, 128, 64, 4, 3, 2, 32)  # 128x128 fp32 scores on 4 warps: does not fit
with R._recording([T], C.Device(90, 132)) as sink:
    T.topk_select(x, W, torch.empty(32768, device="meta"), 32, config=cfg)
name, fn, args, kwargs = sink[0]
_, sig, const, attrs, opts = R._specialize(fn, args, kwargs, 90)
_, res = R._compile_one(("k", fn.fn.__module__, name, sig, const, attrs, dict(opts.__dict__), 90))
print(json.dumps(dict(res, cap=90, kernel=name)))
"""


def test_the_check_catches_a_spilling_config(tmp_path):
    """A test that cannot fail checks nothing: a config known to spill must be reported as spilling."""
    proc = _run(["-c", _SPILLING, str(BENCHMARKS)], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["ldl_stl"] > 0 and any("spills" in p for p in resources.check(row)), row
