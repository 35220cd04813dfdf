"""A/B of the encoder and mixed-precision choices that were built without a GPU (run this first on one).

    python benchmarks/encoder_ab.py [--workloads w1 w2 w3 w4] [--chunks 2048 4096 8192 16384] [--out DIR]

Per DESIGN.md workload, bf16, medians of triton.testing.do_bench, one process:
  encoder alone   cuBLAS GEMM (bf16 out, and fp32 out: what topk_scan's chunks write); the fused top-k
                  encoder on a bf16 W_enc; the fused encoder with the per-call bf16 copy of an fp32 W_enc
                  (the default master-weight path) and with master_in_kernel (fp32 tiles rounded in
                  registers); topk_scan (cuBLAS chunks + the scan kernel) per chunk width. Each row also
                  says whether it chose the fused kernel's latents (the share of rows that agree).
  w4 threshold    the ReLU encoder at a cutoff keeping ~64 entries per row: fused vs GEMM + scan per chunk.
  SAE fwd+bwd     SparseAutoencoder under bf16 autocast: master weights (default), the old autocast copies
                  of every weight (a subclass that casts), and with the best scan chunk; peak memory too.
Writes <device>-master-scan-ab.{txt,json} to --out. Decide from it the triton backend's EncoderOptions
(scan_chunk: 0 = fused; master_in_kernel), and whether the master-weight path beats the copies.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from sae_fast import SparseAutoencoder, dispatch
from sae_fast.bench import DEFAULT_WORKLOADS, autocast_copies_sae, device_slug
from sae_fast.bench import WORKLOADS as BENCH_WORKLOADS
from sae_fast.kernels import scan_encoder as scan
from sae_fast.kernels import threshold_encoder as thr
from sae_fast.kernels import topk_encoder as topk

# (B, d, n, k) of the GPU workloads; the ReLU one (w4, k its mean L0) times the threshold encoder.
WORKLOADS = {name: BENCH_WORKLOADS[name].shape for name in DEFAULT_WORKLOADS["cuda"]}
RELU = {name for name in WORKLOADS if BENCH_WORKLOADS[name].activation == "relu"}
DEVICE = "cuda"  # tests/test_examples.py dry-runs the script on CPU tensors under TRITON_INTERPRET=1


def _ms(fn) -> float | str:
    try:
        return do_bench(fn, warmup=5, rep=50, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a path that fails is a result to report
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def encoder_rows(name, B, d, n, k, chunks):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, d, device=DEVICE, generator=g).bfloat16()
    W32 = torch.randn(n, d, device=DEVICE, generator=g) / d ** 0.5
    W16 = W32.bfloat16()
    c = torch.randn(n, device=DEVICE, generator=g) * 0.1
    _, ref_idx, _, _ = topk.topk_select(x, W16, c, k)
    ref_sorted = ref_idx.sort(1).values
    rows = []

    def row(label, fn, select=None):
        agree = None
        if select is not None:
            try:
                idx = select()[1]
                agree = (idx.sort(1).values == ref_sorted).all(1).float().mean().item()
            except Exception as e:  # noqa: BLE001
                agree = f"{type(e).__name__}"
        rows.append(dict(workload=name, row=label, ms=_ms(fn), same_latents=agree))

    row("cuBLAS GEMM bf16 out (floor)", lambda: x @ W16.T)
    row("cuBLAS GEMM fp32 out", lambda: torch.mm(x, W16.T, out_dtype=torch.float32))
    row("fused, bf16 W_enc", lambda: topk.topk_select(x, W16, c, k), lambda: topk.topk_select(x, W16, c, k))
    row("fused, fp32 W_enc: per-call bf16 copy + tiles (default)",
        lambda: topk.topk_select(x, W32.to(torch.bfloat16), c, k))
    row("fused, fp32 W_enc rounded in the tiles (master_in_kernel)", lambda: topk.topk_select(x, W32, c, k),
        lambda: topk.topk_select(x, W32, c, k))
    for chunk in chunks:
        row(f"GEMM + scan, chunk {chunk}", lambda: scan.topk_scan(x, W16, c, k, chunk=chunk),
            lambda: scan.topk_scan(x, W16, c, k, chunk=chunk))
    return rows


def threshold_rows(name, B, d, n, l0, chunks):
    """The threshold (ReLU) encoder, fused vs GEMM + scan, at a cutoff that keeps about l0 entries per row."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, d, device=DEVICE, generator=g).bfloat16()
    W16 = (torch.randn(n, d, device=DEVICE, generator=g) / d ** 0.5).bfloat16()
    c = torch.randn(n, device=DEVICE, generator=g) * 0.1
    scores = (x.float() @ W16.float().T + c).flatten()
    # The (l0 * B + 1)-th largest score, so about l0 per row pass: torch.topk's radix select on the GPU
    # (kthvalue over the 134M scores at W2 is slow in torch).
    cut = torch.full((n,), float(torch.topk(scores, l0 * B + 1, sorted=False).values.min()), device=DEVICE)
    del scores
    _, ref_idx, need = thr.threshold_select(x, W16, c, cut, 16)
    rows = []

    def row(label, fn):
        try:
            same = torch.equal(fn()[1], ref_idx)
        except Exception as e:  # noqa: BLE001
            same = type(e).__name__
        rows.append(dict(workload=name, row=label, ms=_ms(fn), same_latents=same))

    rows.append(dict(workload=name, row="cuBLAS GEMM bf16 out (floor)", ms=_ms(lambda: x @ W16.T)))
    row("threshold fused (capacity from a first run)", lambda: thr.threshold_select(x, W16, c, cut, need + need // 4))
    for chunk in chunks:
        _, _, need_scan = scan.threshold_scan(x, W16, c, cut, 16, chunk=chunk)
        row(f"threshold GEMM + scan, chunk {chunk}",
            lambda: scan.threshold_scan(x, W16, c, cut, need_scan + need_scan // 4, chunk=chunk))
    return rows


def _sae_step(sae, x):
    def step():
        sae.zero_grad(set_to_none=True)  # fresh gradients each call, as sae-fast bench times fwd+bwd
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            sae(x).loss.backward()

    return step


def sae_rows(name, B, d, n, k, best_chunk):
    x = torch.randn(B, d, device=DEVICE)
    rows = []
    backend = dispatch.lookup_backend("triton")  # what SparseAutoencoder runs on a GPU, with its options
    variants = [("SAE fwd+bwd, master weights (default)", SparseAutoencoder, 0),
                ("SAE fwd+bwd, autocast copies of every weight (before)", autocast_copies_sae(), 0)]
    if best_chunk:
        variants.append((f"SAE fwd+bwd, master weights, GEMM + scan chunk {best_chunk}", SparseAutoencoder, best_chunk))
    for label, cls, chunk in variants:
        sae = cls(d, n, "topk", k=k, k_aux=0, seed=0, device=DEVICE)
        step = _sae_step(sae, x)
        saved, peak = backend.options, None
        backend.options = dataclasses.replace(saved, scan_chunk=chunk)
        try:
            ms = _ms(step)
            if isinstance(ms, float) and DEVICE == "cuda":
                sae.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        finally:
            backend.options = saved
        rows.append(dict(workload=name, row=label, ms=ms, peak_mib_beyond_start=peak))
        del sae, step
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--chunks", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    start, rows = time.time(), []
    for name in args.workloads:
        B, d, n, k = WORKLOADS[name]
        if name in RELU:
            rows += threshold_rows(name, B, d, n, k, args.chunks)
            print(f"{name}: done at {time.time() - start:.0f} s", flush=True)
            continue
        enc_rows = encoder_rows(name, B, d, n, k, args.chunks)
        rows += enc_rows
        scans = [r for r in enc_rows if r["row"].startswith("GEMM + scan") and isinstance(r["ms"], float)]
        best = min(scans, key=lambda r: r["ms"]) if scans else None
        rows += sae_rows(name, B, d, n, k, int(best["row"].split()[-1]) if best else 0)
        print(f"{name}: done at {time.time() - start:.0f} s", flush=True)
    lines = [f"Encoder and mixed-precision A/B on {dev} (torch {torch.__version__}, triton {triton.__version__}); "
             f"bf16, medians of triton.testing.do_bench (ms). Command: python benchmarks/encoder_ab.py "
             f"--workloads {' '.join(args.workloads)} --chunks {' '.join(map(str, args.chunks))}", ""]
    for r in rows:
        ms = f"{r['ms']:9.3f}" if isinstance(r["ms"], float) else r["ms"]
        extra = ""
        if r.get("same_latents") is not None:
            same = r["same_latents"]
            extra = f"  same latents: {same:.4f}" if isinstance(same, float) else f"  same latents: {same}"
        if r.get("peak_mib_beyond_start") is not None:
            extra = f"  peak +{r['peak_mib_beyond_start']} MiB (gradients included)"
        lines.append(f"{r['workload']}  {ms}  {r['row']}{extra}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_slug(torch.device(DEVICE))}-master-scan-ab"
    (out / f"{stem}.txt").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(dict(device=dev, torch=torch.__version__,
                                                      triton=triton.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
