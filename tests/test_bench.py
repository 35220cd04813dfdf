"""`sae-fast bench` at tiny shapes: every row runs the same SAE, results carry their provenance, and a peer
that is missing or breaks is a row saying so. (No timing asserts: speed claims live in benchmarks/results.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae_fast
from sae_fast import bench, cli

REPO = Path(__file__).resolve().parent.parent
FAST = ["--quick", "--repeats", "1", "--warmup", "0", "--quiet"]


def _run(tmp_path, *extra):
    rc = cli.main(["bench", *FAST, "--out", str(tmp_path), *extra])
    files = {p.suffix: p for p in tmp_path.iterdir()}
    return rc, files


def test_quick_cpu_run_prints_and_saves_every_backend(tmp_path, capsys):
    rc, files = _run(tmp_path, "--device", "cpu", "--peers", "none")
    out = capsys.readouterr().out
    assert rc == 0
    assert set(files) == {".json", ".md", ".png"}
    assert files[".json"].name == f"{bench.device_slug(torch.device('cpu'))}-cpu-quick.json"
    data = json.loads(files[".json"].read_text())
    assert data["kind"] == "measurement" and data["command"].startswith("sae-fast bench --quick")
    assert "commit" in data["git"] and data["versions"]["torch"] == torch.__version__
    rows = {r["label"]: r for r in data["workloads"][0]["rows"]}
    fused = [b for b in sae_fast.available_backends() if b not in ("reference", "triton")]
    stepped = [b for b in fused if b == "cpu"]  # backends with a fused training step (FusedAdam)
    expected = ["encoder GEMM (floor)", "sae-fast [reference]"] + [f"sae-fast [{b}]" for b in fused] + [
        label for b in stepped for label in (f"sae-fast trainer step [{b}]", f"sae-fast trainer step, unfused [{b}]")]
    assert list(rows) == expected
    for label, row in rows.items():
        assert row["status"] == "ok", row
        phases = ["fwd"] if row["kind"] == "floor" else list(bench.PHASES)
        if label.startswith("sae-fast trainer step ["):  # one step_fused call: no separate fwd+bwd
            phases = ["fwd", "step"]
        assert list(row["phases"]) == phases and all(row["phases"][p]["median_ms"] > 0 for p in phases)
        assert all(row["phases"][p]["tokens_per_s"] > 0 for p in phases)
        if row["kind"] != "floor":
            assert row["xhat_rel_err"] < 1e-5  # the same SAE as reference.py
            assert row["phases"]["step"]["peak_bytes"] > 0
            assert label in out
    assert "x floor" in out and "speedup" in out
    md = files[".md"].read_text()
    assert "sae-fast bench --quick" in md and "What each row ran" in md


def test_relu_workload_shifts_the_bias_to_the_target_l0():
    w = bench.quick(bench.WORKLOADS["w4"])
    setup = bench.make_setup(w, torch.device("cpu"), "fp32")
    pre = sae_fast.reference.pre_activations(setup.x, setup.W_enc, setup.b_enc, setup.b_dec)
    assert (pre > 0).sum(1).float().mean().item() == pytest.approx(w.k, abs=0.05)
    res = bench.run_workload(w, torch.device("cpu"), "fp32", ["reference", "torch"], [], 0, 1, False)
    assert [r.status for r in res.rows] == ["ok"] * 3
    assert all(r.xhat_rel_err < 1e-5 for r in res.rows[1:])


def test_missing_or_failing_peer_is_a_row_not_a_gap(monkeypatch):
    setup = bench.make_setup(bench.quick(bench.WORKLOADS["cpu"]), torch.device("cpu"), "fp32")
    monkeypatch.setitem(sys.modules, "sparsify", None)  # makes `import sparsify` raise ModuleNotFoundError
    peer = next(c for c in bench.contestants(setup, [], ["sparsify"]) if c.label == "sparsify")
    row, harness = bench.build_row(peer, setup)
    assert harness is None and row.status == "not installed" and "sparsify" in row.error

    def broken(_):
        raise RuntimeError("no kernel image for this device")

    def breaks_in_step(s):  # builds and runs fwd, fwd+bwd, then fails in its optimizer step
        h = bench.sae_fast_harness(s, "torch")
        h.project_grad = lambda: 1 / 0
        return h

    rows = [bench.build_row(bench.Contestant(label, "peer", "settings", fn), setup)
            for label, fn in (("peer X", broken), ("peer Y", breaks_in_step))]
    assert rows[0][0].status == "failed" and "no kernel image" in rows[0][0].error
    for phase in bench.PHASES:
        bench.measure_phase(phase, [(rows[1][0], bench.phase_call(rows[1][1], phase, setup.x, setup))],
                            setup.device, 0, 1)
    assert rows[1][0].status == "failed" and rows[1][0].error.startswith("in step: ZeroDivisionError")
    assert list(rows[1][0].phases) == ["fwd", "fwd_bwd"]
    floor, fn = bench.floor_entry(setup)
    bench.measure_phase("fwd", [(floor, fn)], setup.device, 0, 1)
    res = bench.Result(setup.workload, "fp32", [floor] + [r for r, _ in rows], [])
    meta = {"device": bench.device_info(torch.device("cpu")), "repeats": 1, "warmup": 0, "order": "sequential",
            "versions": bench.versions(), "load_avg_start": [0, 0, 0], "memory_method": "x"}
    text = bench.render_text([res], meta)
    assert "peer X" in text and "failed: RuntimeError: no kernel image" in text
    assert "peer Y" in text and "failed: in step: ZeroDivisionError" in text


@pytest.mark.parametrize("interleave", [True, False])
def test_interleaved_and_sequential_orders_measure_every_row(interleave):
    w = bench.quick(bench.WORKLOADS["cpu"])
    res = bench.run_workload(w, torch.device("cpu"), "fp32", ["reference", "torch"], [], 1, 2, False, interleave)
    assert [r.status for r in res.rows] == ["ok"] * 3
    assert all(len(r.phases[p]["times_ms"]) == 2 for r in res.rows[1:] for p in bench.PHASES)


def test_peers_compute_the_same_sae_when_installed(tmp_path):
    pytest.importorskip("sparsify", reason="eai-sparsify not installed")
    pytest.importorskip("sae_lens", reason="sae-lens not installed")
    w = bench.quick(bench.WORKLOADS["cpu"])
    res = bench.run_workload(w, torch.device("cpu"), "fp32", ["torch"], ["sparsify", "saelens"], 0, 1, False)
    labels = [r.label for r in res.rows]
    assert labels == ["encoder GEMM (floor)", "sae-fast [torch]", "sparsify", "sparsify (patched)",
                      "SAELens rescale=True", "SAELens rescale=True (patched)", "SAELens rescale=False",
                      "SAELens rescale=False (patched)"]
    for r in res.rows[1:]:
        assert r.status == "ok", (r.label, r.error)
        assert r.xhat_rel_err < 1e-5, r.label
    # The patch is on only during a patched row's calls; the table of what it gives lists each patched row.
    from sae_fast import integrations
    assert not integrations.sparsify.is_patched() and not integrations.sae_lens.is_patched()
    from sae_fast.bench.report import patched_rows
    head, body = patched_rows(res)
    assert [cells[0] for cells in body] == [label for label in labels if label.endswith("(patched)")]
    assert all(cell.endswith("x") for cells in body for cell in cells[1:])


def test_peak_memory_on_cpu_is_the_most_bytes_live_at_once_during_the_call():
    cpu, mib4 = torch.device("cpu"), 4 << 20  # torch.ones(1 << 20): 4 MiB of fp32
    one = bench.peak_memory(lambda: torch.ones(1 << 20).sum(), cpu)
    assert one is not None, "torch.profiler's result API moved: the bench would report no CPU memory at all"
    assert mib4 <= one < 2 * mib4

    def three_live_at_once():
        a, b = torch.ones(1 << 20), torch.ones(1 << 20)
        return a + b

    def three_one_after_another():
        for _ in range(3):
            torch.ones(1 << 20).sum()  # each freed before the next is made

    assert bench.peak_memory(three_live_at_once, cpu) >= 3 * mib4
    assert mib4 <= bench.peak_memory(three_one_after_another, cpu) < 2 * mib4  # frees count: a peak, not a sum
    kept = torch.ones(1 << 20)  # live before the call: not the call's
    assert bench.peak_memory(lambda: kept.sum(), cpu) < mib4


def test_custom_shapes_and_bad_flags(tmp_path, capsys):
    rc = cli.main(["bench", *FAST, "--out", "-", "--peers", "none", "--backends", "torch",
                   "--batch", "5", "--d", "7", "--n", "33", "--k", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "cpu-quick-b5-d7-n33-k3: B=5 d=7 n=33 k=3" in out
    assert cli.main(["bench", *FAST, "--out", "-", "--workload", "w9"]) == 2
    assert "--workload" in capsys.readouterr().err
    assert cli.main(["bench", *FAST, "--out", "-", "--k", "0"]) == 2
    assert cli.main(["bench", *FAST, "--out", "-", "--peers", "saelens,foo"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["bench", *FAST, "--out", "-", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_device_slug_names_the_cpu_and_threads():
    slug = bench.device_slug(torch.device("cpu"))
    assert slug.startswith("cpu-") and slug.endswith(f"-{torch.get_num_threads()}t")
    assert all(c.isalnum() or c == "-" for c in slug)


def test_micro_benchmarks_run_once_with_benchmark_disable():
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed (pip install -e '.[bench]')")
    env = dict(os.environ, SAE_FAST_BENCH_SHAPES="tiny", SAE_FAST_BENCH_DEVICE="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_master_weights_script_times_both_paths(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "master_weights.py"
    spec = importlib.util.spec_from_file_location("master_weights", path)
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    med = mw.main(["--device", "cpu", "--quick", "--repeats", "2", "--out", str(tmp_path)])
    assert len(med) == 2 and all(ms > 0 for ms in med.values())
    (out,) = tmp_path.glob("cpu-*-master-weights-cpu-quick.txt")
    assert "ratio: the copies take" in out.read_text() and "ratio" in capsys.readouterr().out
