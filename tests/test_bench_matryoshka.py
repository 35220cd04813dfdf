"""`sae-fast bench --activation matryoshka` at tiny shapes: sae-fast's Matryoshka rows beside the plain ones,
SAELens' Matryoshka SAE, every row computing its reference.py SAE, and the Matryoshka / plain table."""
import json

import pytest
import torch

from sae_fast import bench, cli
from sae_fast.bench.matryoshka import ratio_rows

FAST = ["--quick", "--repeats", "1", "--warmup", "0", "--quiet"]


def test_matryoshka_workload_rows_and_ratios(tmp_path, capsys):
    pytest.importorskip("sae_lens", reason="sae-lens not installed")
    rc = cli.main(["bench", *FAST, "--out", str(tmp_path), "--activation", "matryoshka", "--backends", "torch",
                   "--peers", "all"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["label"]: r for r in data["workloads"][0]["rows"]}
    assert list(rows) == ["encoder GEMM (floor)", "sae-fast TopK [torch]", "sae-fast Matryoshka TopK [torch]",
                          "sae-fast BatchTopK [torch]", "sae-fast Matryoshka BatchTopK [torch]", "sparsify",
                          "SAELens Matryoshka BatchTopK rescale=True", "SAELens Matryoshka BatchTopK rescale=False"]
    assert rows["sparsify"]["status"] == "not applicable"
    for label, row in rows.items():
        if label != "sparsify":
            assert row["status"] == "ok", row
        if row["kind"] != "floor" and label != "sparsify":
            assert row["xhat_rel_err"] < 1e-5, label  # TopK rows against TopK, BatchTopK rows against BatchTopK
    assert "matryoshka=[16, 64, 256, 1024]" in rows["sae-fast Matryoshka TopK [torch]"]["settings"]
    assert "Matryoshka / plain (time)" in out
    assert "sae-fast Matryoshka TopK [torch] / sae-fast TopK [torch]" in out


def test_ratio_table_only_for_the_matryoshka_workload():
    w = bench.quick(bench.WORKLOADS["cpu"])
    res = bench.run_workload(w, torch.device("cpu"), "fp32", ["torch"], [], 0, 1, False)
    assert ratio_rows(res)[1] == []
    assert bench.workloads.matryoshka_widths(1024) == [16, 64, 256, 1024]
    assert bench.workloads.matryoshka_widths(20) == [1, 5, 20]  # collapsing widths stay strictly increasing
