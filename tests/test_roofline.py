"""The roofline model: its byte counts match the tensors the real ops produce, its arithmetic is the stated
roofline, and everything it prints or saves says MODEL."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sae_fast
from sae_fast import cli, ops
from sae_fast.bench import WORKLOADS, roofline
from sae_fast.bench.roofline import GPUS, Kernel, Shape
from sae_fast.bench.roofline_report import render

B, D, N, K = 8, 16, 64, 4
REPO = Path(__file__).resolve().parent.parent


def _kernel(kernels, prefix):
    found = [k for k in kernels if k.name.startswith(prefix)]
    assert len(found) == 1, f"expected one kernel named {prefix!r}, got {[k.name for k in found]}"
    return found[0]


def _tensors(dtype, n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    W_enc, W_dec = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    b_enc, b_dec = torch.randn(n, generator=g), torch.randn(D, generator=g)
    return x, *(t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec))


@pytest.mark.parametrize("n", [N, 16])  # 16: B*k is large enough that the gathers read a bf16 copy of W_dec
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sae_fast_byte_counts_match_the_tensors_of_the_real_ops(dtype, n):
    e = torch.empty((), dtype=dtype).element_size()
    s = Shape(B, D, n, K, "topk", e=e, splits=3)
    ks = roofline.sae_fast_kernels(s)
    x32, W_enc, b_enc, W_dec_master, b_dec = _tensors(torch.float32, n)  # fp32 (master) weights beside x
    x = x32.to(dtype)
    W_dec = ops._gathered(W_dec_master, dtype, B * K, 2)  # what the decode and gather-dot read
    copies = [k for k in ks if k.name.startswith("copy W_dec")]
    assert len(copies) == (W_dec.dtype != W_dec_master.dtype) == (dtype == torch.bfloat16 and n == 16)
    with sae_fast.use_backend("torch"):
        backend = sae_fast.get_backend("cpu")
    pre, idx, _, _ = backend.topk_select(x, W_enc, b_enc, b_dec, K)
    merge = _kernel(ks, "merge split-n partials")
    assert merge.writes == {"pre": pre.nbytes, "idx": idx.nbytes}
    # the split-n partials hold S candidate lists of k (fp32 score, int32 index) per row
    assert merge.reads["partial scores"] == B * 3 * K * torch.empty((), dtype=torch.float32).element_size()
    assert _kernel(ks, "fused encode GEMM").reads["W_enc"] == W_enc.to(dtype).nbytes  # the tiles' copy
    assert _kernel(ks, "fused encode GEMM").reads["x"] == 3 * x.nbytes  # re-read once per split

    values = torch.relu(pre)
    x_hat = backend.sparse_decode(values, idx, W_dec, b_dec)
    dec = _kernel(ks, "sparse decode")
    assert dec.writes == {"x_hat": x_hat.nbytes}
    assert dec.reads == {"values": values.nbytes, "idx": idx.nbytes, "W_dec rows": W_dec[idx.long()].nbytes,
                         "b_dec": b_dec.nbytes}

    g = (x_hat - x).to(dtype).contiguous()  # the gradient of x_hat: x's dtype
    dv = backend.gather_dot(g, idx, W_dec)
    gd = _kernel(ks, "gather-dot")
    assert gd.writes == {"dv": dv.nbytes}
    assert gd.reads["g"] == g.nbytes and gd.reads["W_dec rows"] == W_dec[idx.long()].nbytes
    assert _kernel(ks, "loss backward").writes == {"g": g.nbytes}

    xc = (x - b_dec).to(dtype)
    dW_enc, db_enc, dW_dec = backend.latent_backward(idx, n, dp=dv, xc=xc, v=values, g=g, grad_dtype=torch.float32)
    lb = _kernel(ks, "latent-sorted backward")
    assert lb.writes == {"dW_enc": dW_enc.nbytes, "db_enc": db_enc.nbytes, "dW_dec": dW_dec.nbytes}
    rows = torch.arange(B).repeat_interleave(K)  # the row of each (row, slot) entry, gathered per latent
    assert lb.reads["xc rows"] == xc[rows].nbytes and lb.reads["g rows"] == g[rows].nbytes
    dx = backend.sparse_decode(dv, idx, W_enc)
    assert _kernel(ks, "dx = sparse decode").writes == {"dx": dx.nbytes}

    casts = [k for k in ks if k.name.startswith("cast weights")]
    assert not [k for k in ks if k.name.startswith("cast gradients")]  # gradients are written in fp32
    assert dW_enc.dtype == dW_dec.dtype == torch.float32
    if dtype == torch.float32:
        assert not casts
    else:  # the encoder tiles' copy of W_enc, nothing else
        assert casts[0].reads == {"W_enc": W_enc.nbytes} and sum(casts[0].writes.values()) == W_enc.to(dtype).nbytes


def test_optimizer_byte_counts_match_adam_state():
    s = Shape(B, D, N, K, "topk", e=4)
    params = [torch.nn.Parameter(t.float()) for t in _tensors(torch.float32)[1:]]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = [t for p in params for name, t in opt.state[p].items() if name in ("exp_avg", "exp_avg_sq")]
    adam = _kernel(roofline.optimizer(s), "Adam")
    p_bytes = sum(p.nbytes for p in params)
    assert adam.reads == {"params": p_bytes, "grads": sum(p.grad.nbytes for p in params),
                          "exp_avg": p_bytes, "exp_avg_sq": p_bytes}
    assert sum(adam.writes.values()) == p_bytes + sum(t.nbytes for t in state)
    assert s.params * 4 == p_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_peer_byte_counts_match_torch_tensors(dtype):
    e = torch.empty((), dtype=dtype).element_size()
    s = Shape(B, D, N, K, "topk", e=e)
    ks = roofline.dense_kernels(s)
    x32, W_enc, b_enc, W_dec, b_dec = _tensors(dtype)
    xc = (x32.to(dtype) - b_dec)
    pre = xc @ W_enc.T
    gemm = _kernel(ks, "encoder GEMM")
    assert gemm.writes == {"pre": pre.nbytes} and gemm.reads == {"xc": xc.nbytes, "W_enc": W_enc.nbytes}
    assert gemm.flops == 2 * B * D * N
    values, indices = torch.topk(pre, K, dim=-1)
    assert _kernel(ks, "torch.topk").writes == {"values": values.nbytes, "indices": indices.nbytes}
    acts = torch.zeros_like(pre).scatter_(-1, indices, values)
    assert _kernel(ks, "dense activations").writes == {"acts": acts.nbytes}
    g = torch.randn(B, D).to(dtype)
    assert _kernel(ks, "decoder backward d_acts").writes == {"d_acts": (g @ W_dec.T).nbytes}
    assert _kernel(ks, "decoder backward dW_dec").writes == {"dW_dec": (acts.T @ g).nbytes}
    assert _kernel(ks, "encoder backward dW_enc").writes == {"dW_enc": (acts.T @ xc).nbytes}
    assert sum(1 for k in ks if k.tensor_core) == 6  # the dense step's six GEMMs


def test_sparsify_byte_counts_match_its_backward_tensors():
    s = Shape(B, D, N, K, "topk", e=4)
    ks = roofline.sparsify_kernels(s)
    x32, W_enc, b_enc, W_dec, b_dec = _tensors(torch.float32)
    xc = x32 - b_dec
    pre = F.relu(F.linear(xc, W_enc, b_enc))
    values, indices = pre.topk(K, sorted=False)
    assert _kernel(ks, "torch.topk").writes == {"values": values.nbytes, "indices": indices.nbytes}
    contributions = values.unsqueeze(2) * xc.unsqueeze(1)  # what its encoder backward materialises
    assert _kernel(ks, "encoder bwd: contributions").writes == {"contributions": contributions.nbytes}
    x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    dec = _kernel(ks, "embedding-bag decode")
    assert dec.writes == {"x_hat": x_hat.nbytes} and dec.reads["W_dec rows"] == W_dec[indices].nbytes


def test_relu_workload_counts_K_entries_per_row():
    # Every row has exactly 5 positive pre-activations (x = 0, so pre = b_enc): the compacted lists the ops write.
    b_enc = torch.full((N,), -1.0)
    b_enc[torch.tensor([3, 11, 17, 40, 63])] = 1.0
    with sae_fast.use_backend("torch"):
        backend = sae_fast.get_backend("cpu")
    pre, idx = backend.threshold_select(torch.zeros(B, D), torch.zeros(N, D), b_enc, torch.zeros(D), torch.zeros(N))
    assert pre.shape == (B, 5)
    ks = roofline.sae_fast_kernels(Shape(B, D, N, 5, "relu", e=4))
    assert _kernel(ks, "fused encode GEMM + threshold").writes == {"pre": pre.nbytes, "idx": idx.nbytes}
    assert not roofline.applies("sparsify", "relu") and roofline.applies("saelens", "relu")


def _alone(flops, nbytes, tensor_core):
    return Kernel("k", "fwd", flops, tensor_core, {"a": nbytes / 2}, {"b": nbytes / 2})


@pytest.mark.parametrize("tensor_core", [True, False])
@pytest.mark.parametrize("e", [2, 4])
@pytest.mark.parametrize("gpu", list(GPUS.values()), ids=list(GPUS))
def test_time_is_the_roofline_max_of_compute_and_memory(gpu, e, tensor_core):
    compute, memory = _alone(2e12, 0, tensor_core), _alone(0, 3e9, tensor_core)
    for f_scale, b_scale in [(1, 1), (1, 100), (100, 1)]:
        k = _alone(2e12 * f_scale, 3e9 * b_scale, tensor_core)
        tc = _alone(2e12 * f_scale, 0, tensor_core).seconds(gpu, e)
        tm = _alone(0, 3e9 * b_scale, tensor_core).seconds(gpu, e)
        assert k.seconds(gpu, e) == max(tc, tm)  # the slower of its two bottlenecks, nothing added
        assert k.bound(gpu, e) == ("compute" if tc >= tm else "memory")
    # linear in the work of its bottleneck; reads and writes both move bytes
    assert _alone(4e12, 0, tensor_core).seconds(gpu, e) == pytest.approx(2 * compute.seconds(gpu, e))
    assert _alone(0, 6e9, tensor_core).seconds(gpu, e) == pytest.approx(2 * memory.seconds(gpu, e))
    assert Kernel("r", "fwd", 0, tensor_core, {"a": 3e9}, {}).seconds(gpu, e) == pytest.approx(memory.seconds(gpu, e))
    # bytes cost the same whatever does the arithmetic; CUDA-core flops are slower than tensor-core flops
    assert memory.seconds(gpu, e) == _alone(0, 3e9, not tensor_core).seconds(gpu, e)
    assert _alone(2e12, 0, False).seconds(gpu, e) > _alone(2e12, 0, True).seconds(gpu, e)


def test_memory_bound_time_follows_the_bandwidth_and_gemms_the_dtype():
    h100, h200 = GPUS["h100"], GPUS["h200"]
    memory, compute = _alone(0, 3e9, False), _alone(2e12, 0, True)
    assert memory.seconds(h100, 2) / memory.seconds(h200, 2) == pytest.approx(h200.hbm_tb_s / h100.hbm_tb_s)
    # bf16 (e = 2) tensor-core GEMMs run faster than TF32 (fp32 operands, e = 4); CUDA-core work ignores e
    assert compute.seconds(h100, 2) < compute.seconds(h100, 4)
    assert _alone(2e12, 0, False).seconds(h100, 2) == _alone(2e12, 0, False).seconds(h100, 4)
    assert all("datasheet" in g.source for g in GPUS.values())


def test_model_of_the_design_workloads_is_plausible():
    gpu = GPUS["h100"]
    w1, w2 = (roofline.model_workload(WORKLOADS[w], gpu) for w in ("w1", "w2"))
    assert w2["encoder_gemm"]["seconds"] == pytest.approx(4 * w1["encoder_gemm"]["seconds"])  # n x4, compute-bound
    for res in (w1, w2):
        a = res["algorithms"]
        ours = a["sae-fast"]["seconds"]
        assert 1.0 < a["sae-fast"]["ratio_to_encoder_gemm"]["fwd"]  # never below its own GEMM
        for peer in ("saelens", "saelens-rescale", "sparsify"):
            assert ours["fwd_bwd"] < a[peer]["seconds"]["fwd_bwd"]

    # n x4 (W1 -> W2): sae-fast's work beside the GEMM is per active latent, so it grows less than any peer's,
    # whose (B, n) passes grow with n; the committed results show it as a falling ratio to the GEMM.
    def beyond_gemm(res, algo):
        return res["algorithms"][algo]["seconds"]["fwd"] - res["encoder_gemm"]["seconds"]

    algos = ("sae-fast", "saelens", "saelens-rescale", "sparsify")
    growth = {a: beyond_gemm(w2, a) / beyond_gemm(w1, a) for a in algos}
    assert all(growth["sae-fast"] < g for a, g in growth.items() if a != "sae-fast"), growth
    ratio = lambda res: res["algorithms"]["sae-fast"]["ratio_to_encoder_gemm"]["fwd"]  # noqa: E731
    assert ratio(w2) < ratio(w1)


@pytest.mark.parametrize("field", ["batch", "n", "k"])
def test_predicted_times_grow_with_the_work(field):
    gpu, w = GPUS["h100"], WORKLOADS["w1"]
    runs = [roofline.model_workload(replace(w, **{field: getattr(w, field) * f}), gpu) for f in (1, 2, 4)]
    for algo in ("sae-fast", "saelens", "saelens-rescale", "sparsify"):
        for phase in ("fwd", "fwd_bwd", "step"):
            t = [r["algorithms"][algo]["seconds"][phase] for r in runs]
            assert t[0] < t[1] < t[2], (algo, phase, t)
    # sae-fast gathers B*k rows: k is its cost; the dense peers pay for (B, n) whatever k is
    ours = [r["algorithms"]["sae-fast"]["seconds"]["step"] for r in runs]
    dense = [r["algorithms"]["saelens"]["seconds"]["step"] for r in runs]
    if field == "k":
        assert ours[2] / ours[0] > dense[2] / dense[0]


def test_fused_optimizer_variant_changes_only_the_backward_and_optimizer():
    s = Shape(B, D, N, K, "topk", e=2, splits=3)
    built, fused = roofline.sae_fast_kernels(s), roofline.sae_fast_kernels(s, fused_optimizer=True)
    assert [k for k in fused if k.phase == "fwd"] == [k for k in built if k.phase == "fwd"]
    text = render(GPUS["h100"], [roofline.model_workload(WORKLOADS["w1"], GPUS["h100"])])
    row = next(line.split() for line in text.splitlines() if line.startswith("sae-fast+fused-opt"))
    assert row[3:5] == ["-", "-"]  # one fused step: no fwd+bwd of its own is printed


def test_printed_speedups_are_the_modelled_step_ratios():
    gpu = GPUS["h200"]
    res = roofline.model_workload(WORKLOADS["w1"], gpu)
    steps = {a: v["seconds"]["step"] for a, v in res["algorithms"].items()}
    printed = {line.split()[0]: line.split()[-1] for line in render(gpu, [res]).splitlines()
               if line.split() and line.split()[0] in steps}
    assert printed.pop("sae-fast") == "-"
    assert printed == {a: f"{steps[a] / steps['sae-fast']:.2f}x" for a in printed}
    assert float(printed["saelens"][:-1]) > 1  # the model's claim: the dense peer's step is slower


def test_cli_model_output_is_labelled_model(tmp_path, capsys):
    assert cli.main(["bench", "--model", "h200", "--workload", "w1,w4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MODEL") and "w1:" in out and "w4:" in out and "measured" not in out
    data = json.loads((tmp_path / "model-h200-w1-w4.json").read_text())
    assert data["kind"].startswith("MODEL") and data["gpu"] == asdict(GPUS["h200"])
    assert (tmp_path / "model-h200-w1-w4.md").read_text().startswith("# MODEL")
    assert cli.main(["bench", "--model", "a100", "--out", "-"]) == 2


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_committed_predictions_are_current(gpu):
    path = REPO / "benchmarks" / "results" / f"model-{gpu}.json"
    if not path.exists():
        pytest.skip(f"{path} not committed")
    committed = json.loads(path.read_text())["workloads"]
    current = [roofline.model_workload(WORKLOADS[w], GPUS[gpu]) for w in ("w1", "w2", "w3", "w4")]
    assert json.loads(json.dumps(current)) == committed, (
        f"the model changed: re-run `sae-fast bench --model {gpu}` and commit benchmarks/results/model-{gpu}.*")
