"""benchmarks/gpu_run.sh's quick mode (QUICK=1) is for a short GPU lease, which is scarce: its steps that
need no GPU run here first, as the script writes them (arguments read from the script itself), on CPU
tensors under Triton's interpreter at a tiny W2. Only the GPU tests (``pytest -m gpu``) are left out.
"""
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from helpers import BENCHMARKS, load_script  # noqa: E402

import sae_fast.bench.workloads as bench_workloads  # noqa: E402
from sae_fast import cli  # noqa: E402

# d = 80: the trainer-step row's default k_aux = d / 2 = 40 is above the fused encoder's AuxK list (32).
TINY_W2 = bench_workloads.Workload("w2", 12, 80, 96, 4)


def quick_commands() -> list[list[str]]:
    """The commands of gpu_run.sh's QUICK=1 branches, continuation lines joined, $OUT left as it is."""
    text = (BENCHMARKS / "gpu_run.sh").read_text().replace("\\\n", " ")
    cmds = []
    for block in re.findall(r'if \[ "\$\{QUICK:-0\}" = 1 \]; then\n(.*?)\n\s*else', text, re.S):
        cmds += [shlex.split(line.split(">", 1)[0]) for line in block.splitlines() if line.strip()]
    return cmds


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_quick_mode_runs_on_the_interpreter(tmp_path, monkeypatch):
    cmds = quick_commands()
    kinds = [next((w for w in c if w.endswith(".py")), " ".join(c[:2])) for c in cmds]
    assert kinds == ["benchmarks/encoder_ab.py", "sae-fast bench", "benchmarks/profile_step.py"], cmds
    ab_cmd, bench_cmd, prof_cmd = cmds
    out = str(tmp_path)
    sub = lambda cmd: [out if a == "$OUT" else a.replace("$OUT", out) for a in cmd]  # noqa: E731
    monkeypatch.setitem(bench_workloads.WORKLOADS, "w2", TINY_W2)

    # 1. the encoder A/B at W2 (fused vs GEMM + scan), its chunk width shrunk to a few tiles of the tiny n
    ab = load_script("encoder_ab")
    monkeypatch.setattr(ab, "DEVICE", "cpu")
    monkeypatch.setattr(ab, "WORKLOADS", {"w2": (12, 16, 64, 4)})
    monkeypatch.setattr(ab, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    argv = sub(ab_cmd[ab_cmd.index("benchmarks/encoder_ab.py"):])
    argv[argv.index("--chunks") + 1] = "40"
    monkeypatch.setattr(sys, "argv", argv)
    ab.main()
    (ab_json,) = tmp_path.glob("cpu-*-master-scan-ab.json")
    rows = {r["row"]: r for r in json.loads(ab_json.read_text())["rows"]}
    assert rows["GEMM + scan, chunk 40"]["ms"] == 1.0 and rows["GEMM + scan, chunk 40"]["same_latents"] == 1.0

    # 2. the W2 bench with the trainer-step row and sparsify, on CPU tensors (cuda -> cpu, 1 repeat)
    argv = sub(bench_cmd[1:])
    assert _arg(argv, "--device") == "cuda" and _arg(argv, "--workload") == "w2"
    argv[argv.index("--device") + 1] = "cpu"
    for flag, value in (("--repeats", "1"), ("--warmup", "0")):
        argv[argv.index(flag) + 1] = value
    assert cli.main(argv + ["--dtype", "bf16"]) == 0
    (bench_json,) = tmp_path.glob("*-w2.json")
    result = json.loads(bench_json.read_text())
    labels = {r["label"]: r for w in result["workloads"] for r in w["rows"]}
    step = [r for label, r in labels.items() if "trainer step" in label]
    assert step and all(r["status"] == "ok" for r in step), step
    assert any("sparsify" in label for label in labels), sorted(labels)

    # 3. the profile of the fused step, with its trace
    prof = load_script("profile_step")
    monkeypatch.setattr(prof, "DEVICE", "cpu")
    argv = sub(prof_cmd[prof_cmd.index("benchmarks/profile_step.py"):])
    assert "--fused-step" in argv
    argv[argv.index("--steps") + 1] = "1"
    monkeypatch.setattr(sys, "argv", argv)
    prof.main()
    assert Path(_arg(argv, "--trace")).stat().st_size > 0
