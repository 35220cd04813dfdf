"""Time the Triton kernels' launch configs on a GPU (the launchers' defaults are chosen from this).

    python benchmarks/triton_tune.py [--family encoder threshold backward] [--budget-s 480] [--out FILE]

For each DESIGN.md workload (bf16): the cuBLAS GEMM at the same shape (the floor), the launcher's
default config, then a grid of configs, each the median of triton.testing.do_bench. Configs that fail to
compile (out of shared memory or registers) are reported as such. Prints one line per config, sorted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton
from triton.testing import do_bench

from sae_fast.bench.workloads import DEFAULT_WORKLOADS, WORKLOADS
from sae_fast.kernels import latent_backward as lb
from sae_fast.kernels import threshold_encoder as thr
from sae_fast.kernels import topk_encoder as topk
from sae_fast.kernels.encoder_common import Device, EncoderConfig, splits_for

# (B, d, n, k) of the GPU workloads (k: the ReLU one's mean L0).
TOPK = {w.name: w.shape for w in map(WORKLOADS.get, DEFAULT_WORKLOADS["cuda"]) if w.activation == "topk"}
RELU = {w.name: w.shape for w in map(WORKLOADS.get, DEFAULT_WORKLOADS["cuda"]) if w.activation == "relu"}


def _time(fn) -> float | str:
    try:
        return do_bench(fn, warmup=5, rep=40, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a crash
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def _tensors(B, d, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, d, device="cuda", generator=g).bfloat16()
    W = (torch.randn(n, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    c = torch.randn(n, device="cuda", generator=g) * 0.1
    return x, W, c


def tune_encoder(deadline, rows):
    for name, (B, d, n, k) in TOPK.items():
        x, W, c = _tensors(B, d, n)
        rows.append((name, "gemm (cuBLAS bf16)", _time(lambda: x @ W.T)))
        rows.append((name, "topk default", _time(lambda: topk.topk_select(x, W, c, k))))
        kp = triton.next_power_of_2(k)
        for bm, bn, warps, stages, small, mult in itertools.product(
                (64, 128), (64, 128, 256), (4, 8), (3,), (kp, 4), (1, 2)):
            if time.time() > deadline:
                return
            tiles = triton.cdiv(n, max(bn, kp))
            splits = splits_for(triton.cdiv(B, bm), tiles, Device.of(x).sms, 8) * mult
            cfg = EncoderConfig(bm, max(bn, kp), 64, warps, stages, splits, small)
            rows.append((name, f"topk {cfg}", _time(lambda: topk.topk_select(x, W, c, k, config=cfg))))


def tune_threshold(deadline, rows):
    for name, (B, d, n, l0) in RELU.items():
        x, W, c = _tensors(B, d, n)
        p = (x.float() @ W.float().T + c)
        t = float(torch.topk(p.flatten(), l0 * B).values[-1])
        del p
        cut = torch.full((n,), t, device="cuda")
        rows.append((name, "gemm (cuBLAS bf16)", _time(lambda: x @ W.T)))
        rows.append((name, "threshold default (cap 96)", _time(lambda: thr.threshold_select(x, W, c, cut, 96))))
        for bm, bn, warps, stages in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)):
            if time.time() > deadline:
                return
            splits = splits_for(triton.cdiv(B, bm), triton.cdiv(n, bn), Device.of(x).sms, 8)
            cfg = EncoderConfig(bm, bn, 64, warps, stages, splits, 1)
            rows.append((name, f"threshold {cfg}", _time(lambda: thr.threshold_select(x, W, c, cut, 96, config=cfg))))


def tune_backward(deadline, rows):
    for name, (B, d, n, k) in TOPK.items():
        g = torch.Generator(device="cuda").manual_seed(1)
        idx = torch.randint(0, n, (B, k), device="cuda", generator=g, dtype=torch.int32)
        dp, v = torch.randn(B, k, device="cuda"), torch.randn(B, k, device="cuda")
        xc, gr = torch.randn(B, d, device="cuda").bfloat16(), torch.randn(B, d, device="cuda").bfloat16()
        rows.append((name, "sort_by_latent only", _time(lambda: lb.sort_by_latent(idx, n, dp != 0))))
        rows.append((name, "backward default", _time(lambda: lb.latent_backward(idx, n, dp, xc, v, gr))))
        rows.append((name, "write 2 x (n, d) bf16 (floor)",
                     _time(lambda: (torch.zeros(n, d, device="cuda", dtype=torch.bfloat16),
                                    torch.zeros(n, d, device="cuda", dtype=torch.bfloat16)))))
        configs = [lb.LatentBackwardConfig(bl, bd, w)
                   for bl, bd, w in itertools.product((4, 8, 16), (64, 128, 256), (4, 8))]
        for cfg in configs:
            if time.time() > deadline:
                return
            rows.append((name, f"backward {cfg}", _time(lambda: lb.latent_backward(idx, n, dp, xc, v, gr, config=cfg))))


def _fastest_first(row):
    """Sort key: timed configs by time, then those that failed (their time is an error message)."""
    failed = isinstance(row[2], str)
    return failed, 0 if failed else row[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="+", default=["backward", "encoder", "threshold"])
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    start = time.time()
    rows = []
    fams = {"encoder": tune_encoder, "threshold": tune_threshold, "backward": tune_backward}
    for i, fam in enumerate(args.family):  # an equal share of what is left for each family
        share = (args.budget_s - (time.time() - start)) / (len(args.family) - i)
        fams[fam](time.time() + share, rows)
        print(f"{fam}: done at {time.time() - start:.0f} s", flush=True)
    dev = torch.cuda.get_device_name()
    for wl in sorted({r[0] for r in rows}):
        print(f"\n== {wl} on {dev} (ms, median)")
        for _, label, t in sorted((r for r in rows if r[0] == wl), key=_fastest_first):
            print(f"{t if isinstance(t, str) else f'{t:9.3f}'}  {label}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
