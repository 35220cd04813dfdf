"""The training loop: activations in, one SAE per hooked layer out.

Per step: ``grad_accum`` micro-batches, each layer's SAE forward/backward (losses from the module:
TopK/BatchTopK = FVU + AuxK on dead latents; ReLU = MSE + warmed-up L1; JumpReLU = MSE + warmed-up L0),
then for TopK/BatchTopK the decoder gradient's component parallel to each row is removed, Adam steps,
and decoder rows are renormalised to unit norm. With ``fused_step`` (the default) and one micro-batch,
where a fused kernel applies, all of that is one ``FusedAdam.step_fused`` per layer (same math, same Adam
state). Losses are summed on the device and read only at logging steps. Everything a step depends on (weights, Adam moments,
the dead-latent counters, the data position, the RNG) is in the checkpoint, so a resumed run takes the
same steps as one that never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from .. import ops
from ..activations import ActivationStore, collect_text, default_corpus, load_model, read_corpus
from ..activations.hooks import TARGET_SUFFIX, capture, middle_layer, resolve_layers
from ..activations.model import DEFAULT_MODEL_NAME, default_layer, default_model_path, model_id
from ..activations.normalization import save_normalization
from ..checks import deferred_finite_checks, raise_if_nonfinite
from ..distributed.runtime import plan_for
from ..folders import atomic_write_text, disk_full_error, is_disk_full
from ..io import save_sae, save_saelens, save_sparsify
from ..matryoshka import prefix_reconstructions
from ..optim import FusedAdam, make_adam, training_loss
from ..sae import SAEConfig, SparseAutoencoder
from .checkpoint import list_checkpoints, newest_intact, read_manifest
from .config import TrainConfig
from .lm_eval import splice_eval
from .metrics import MetricsLog, plot_curves
from .preflight import check_backend, check_folder, fingerprint_changes, resolve_device
from .runfolder import RunLock, trajectory_changes
from .schedule import lr_factor, sparsity_factor

_DECODER_UNIT_NORM = ("topk", "batchtopk")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the message names the step, the layer and a likely cause."""


class Trainer:
    """``Trainer(TrainConfig(...)).run()`` collects (or reuses) activations, trains, and writes the run folder."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.log = print
        check_backend(cfg.backend, self.device)
        self.dist = plan_for(self)  # sae_fast.distributed's hooks; single-process ones unless --distributed
        check_folder("--out", self.out)
        if cfg.cache_dir:
            check_folder("--cache-dir", cfg.cache_dir)

    # ------------------------------------------------------------------ data
    def _fingerprint(self) -> dict:
        c = self.cfg
        model = str(default_model_path()) if c.model is None else c.model
        return {"model": model, "layer": c.layer, "corpus": c.corpus, "ctx_len": c.ctx_len, "max_tokens": c.token_budget,
                "eval_tokens": c.eval_tokens, "exclude_special_tokens": c.exclude_special_tokens,
                "cache_dtype": c.cache_dtype, "shard_tokens": c.shard_tokens, "model_batch": c.model_batch,
                "sink_factor": c.sink_factor, **({"transcode": True} if c.transcode else {})}  # inputs cached too

    def _target(self, layer: str) -> str | None:
        """The store key of a transcoder's target (the module's output); None for an SAE."""
        return layer + TARGET_SUFFIX if self.cfg.transcode else None

    def _sae_layers(self, keys) -> list[str]:
        """The hooked modules among a store's keys (a transcoder's targets left out)."""
        return [k for k in keys if not k.endswith(TARGET_SUFFIX)]

    def load_data(self) -> tuple[ActivationStore, ActivationStore]:
        """Activations for this run: from ``cache_dir`` when it holds a matching store, else collected now
        (into ``cache_dir`` when given, else into memory)."""
        c = self.cfg
        fingerprint = self._fingerprint()
        if c.cache_dir:
            train = ActivationStore.open(Path(c.cache_dir) / "train")
            evals = ActivationStore.open(Path(c.cache_dir) / "eval")
            if train and evals and train.fingerprint == fingerprint and evals.fingerprint == fingerprint:
                self.log(f"activations: reusing {train.n_rows} tokens from {c.cache_dir}")
                return train, evals
            for store in (train, evals):  # another configuration's cache is never overwritten
                if store and store.fingerprint != fingerprint:
                    raise ValueError(f"--cache-dir {c.cache_dir} holds the activations of another configuration ("
                                     f"{', '.join(fingerprint_changes(store.fingerprint, fingerprint))}); "
                                     "pass a new --cache-dir, or delete that one")
        name = DEFAULT_MODEL_NAME if c.model is None else c.model
        self.log(f"model: {name}")
        model, tokenizer = load_model(c.model, device=self.device)
        if tokenizer is None:
            raise ValueError(f"model {name!r} has no tokenizer; train on text needs one")
        if c.layer is None:
            layer = default_layer(c.model) or middle_layer(model)
        else:
            layer = c.layer
        layers = resolve_layers(model, layer)
        probe = capture(model, layers, transcode=c.transcode,
                        **{k: v.to(self.device) for k, v in tokenizer("probe", return_tensors="pt").items()})
        self.check_widths({n: probe[n].shape[-1] for n in self._sae_layers(probe)})  # k vs n before collecting
        texts = default_corpus() if c.corpus is None else read_corpus(c.corpus)
        self.log(f"corpus: {'Python docs (pydoc_data.topics) + stdlib sources' if c.corpus is None else c.corpus}; "
                 f"layers: {', '.join(layers)}")
        try:
            train, evals = collect_text(
                model, tokenizer, layers, texts, ctx_len=c.ctx_len, batch_size=c.model_batch, max_tokens=c.token_budget,
                eval_tokens=c.eval_tokens, exclude_special=c.exclude_special_tokens, seed=0, folder=c.cache_dir,
                shard_tokens=c.shard_tokens, dtype=c.cache_dtype, fingerprint=fingerprint, progress=c.progress,
                sink_factor=c.sink_factor, transcode=c.transcode)
        except (OSError, SafetensorError) as e:
            if c.cache_dir and is_disk_full(e):
                raise disk_full_error(c.cache_dir) from e
            raise
        st = train.stats
        self.log(f"left out {st['special_excluded']:,} special/BOS tokens and {st['sinks_excluded']:,} attention-sink "
                 f"tokens (norm > {c.sink_factor:g}x the median) of {st['windows_tokens']:,} read")
        del model
        return train, evals

    # ------------------------------------------------------------------ model
    def check_widths(self, widths: dict) -> None:
        """What the layers' widths decide: k against each layer's number of latents."""
        c = self.cfg
        for n, d in widths.items():
            n_latents = c.n_latents or c.expansion * d
            if c.activation in ("topk", "batchtopk") and c.k > n_latents:
                raise ValueError(f"--k {c.k} is more than the {n_latents} latents of layer {n!r} "
                                 f"(--expansion {c.expansion} x width {d}); lower --k or raise --expansion/--n-latents")
            if c.matryoshka is not None and c.matryoshka_widths[-1] != n_latents:
                raise ValueError(f"--matryoshka's last width must be the {n_latents} latents of layer {n!r} "
                                 f"(--expansion {c.expansion} x width {d}); got {c.matryoshka!r}")

    def _make_sae(self, d: int, d_out: int | None = None) -> SparseAutoencoder:
        c = self.cfg
        sae_cfg = SAEConfig(d_in=d, n_latents=c.n_latents or c.expansion * d, activation=c.activation, k=c.k,
                            l1_coeff=c.l1_coeff, l0_coeff=c.l0_coeff, k_aux=c.k_aux, aux_coeff=c.aux_coeff,
                            dead_tokens=c.dead_tokens, matryoshka=c.matryoshka_widths, transcode=c.transcode,
                            d_out=d_out, skip_connection=c.skip_connection)
        return self.dist.make_sae(sae_cfg, self.device, c.seed)  # a shard / data-parallel wrapper when distributed

    def total_steps(self, n_rows: int) -> int:
        c = self.cfg
        return c.steps or max(1, math.ceil(c.epochs * n_rows / c.batch_tokens))

    def _optimizers(self, saes: dict, autocast) -> tuple[dict, bool]:
        """One Adam per layer: FusedAdam where its fused step applies (said in the log), else make_adam's."""
        c = self.cfg
        mode = getattr(self.dist, "mode", "none")
        reason = "--no-fused-step" if not c.fused_step else (
            f"grad_accum={c.grad_accum}" if c.grad_accum > 1 else
            # their gradients are summed across ranks (data) or their SAE is a shard wrapper (latent)
            f"--distributed {mode}" if mode in ("data", "latent") else None)
        if reason is None:
            fused = {n: FusedAdam(sae, lr=c.lr) for n, sae in saes.items()}
            with autocast:
                probe = {n: fused[n].fused_reason(torch.zeros(1, sae.d_in, device=self.device))
                         for n, sae in saes.items()}
            reason = next((r for r in probe.values() if r), None)
            if reason is None:
                self.log("step: fused (sae_fast.optim.FusedAdam)")
                return fused, True
        self.log(f"step: unfused ({reason})")
        return {n: make_adam(sae.parameters(), c.lr) for n, sae in saes.items()}, False

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        c = self.cfg
        backend = ops.use_backend(c.backend) if c.backend else contextlib.nullcontext()
        with backend, deferred_finite_checks():  # the NaN/inf check on x is read at logging steps only
            return self._run()

    def _run(self) -> dict:
        c = self.cfg
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {c.out!r} cannot be created: {e.strerror}") from None
        with RunLock(self.out, self.log) if self.dist.writes_files else contextlib.nullcontext():  # rank 0 holds it
            return self._run_locked()

    def _resume_point(self, ckpt_root: Path):
        """With --resume, before any expensive work: refuse a changed configuration, pick the newest intact
        checkpoint (falling back past damaged ones), and say when the run has already finished."""
        existing = list_checkpoints(ckpt_root)
        if not existing:
            self.log(f"no checkpoint in {ckpt_root}: starting from step 0")
            return None
        saved = None
        for path in reversed(existing):
            with contextlib.suppress(ValueError):
                saved = read_manifest(path).get("config")
                break
        if isinstance(saved, dict):
            changes = trajectory_changes(saved, self.cfg.to_dict())
            if changes:
                raise ValueError(f"--resume with a different configuration than the checkpoint ({', '.join(changes)}); "
                                 "use the same settings, or train in a new --out folder")
        return newest_intact(ckpt_root, self.cfg.batch_tokens, self.log)

    def _run_locked(self) -> dict:
        c = self.cfg
        torch.manual_seed(c.seed)
        ckpt_root = self.out / "checkpoints"
        for stale in ckpt_root.glob(".step_*"):  # a checkpoint being written when the run was killed
            shutil.rmtree(stale, ignore_errors=True)
        ckpt = self._resume_point(ckpt_root) if c.resume else None
        if ckpt is not None and ckpt.meta["step"] == ckpt.meta.get("total_steps") and (self.out / "summary.json").is_file():
            return self._finished(ckpt)
        train, evals = self.dist.load_data(self.load_data)
        self._check_held_out(evals)
        self.check_widths({n: train.widths[n] for n in self._sae_layers(train.layers)})
        layers, scales = self._sae_layers(train.layers), train.scales() if c.normalize else {n: 1.0 for n in train.layers}
        layers = self.dist.own_layers(layers)
        total = self.total_steps(train.n_rows)
        micro = c.batch_tokens // c.grad_accum
        saes = {n: self._make_sae(train.widths[n], train.widths[self._target(n)] if c.transcode else None)
                for n in layers}
        bf16 = c.dtype == "bf16" or (c.dtype == "auto" and self.device.type == "cuda")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        opts, fused = self._optimizers(saes, autocast)
        opts = {n: self.dist.optimizer(opt, saes[n]) for n, opt in opts.items()}  # data parallel: gradient sums

        step, pos = 0, 0
        sums: dict[str, dict[str, float]] = {n: {} for n in layers}  # metrics summed since the last log row
        since = 0
        if ckpt is not None:
            meta = self.dist.restore(ckpt, saes, opts)
            step, pos = meta["step"], meta["data_position"]
            sums, since = meta["log_sums"], meta["log_since"]
            if step > total:
                raise ValueError(f"checkpoint {ckpt.path} is at step {step}, past this run's {total} steps")
            self.log(f"resuming from {ckpt.path} (step {step}/{total})")
        else:
            existing = list_checkpoints(ckpt_root)
            if existing and not c.resume:
                self.log(f"starting fresh in {self.out} (pass --resume to continue the run there)")
            for p in existing:
                shutil.rmtree(p, ignore_errors=True)
            first = next(train.batches(c.batch_tokens, seed=c.seed, group_shards=c.group_shards,
                                       normalize=c.normalize, device=self.device))
            with torch.no_grad():  # start b_dec at the data mean: the SAE then models deviations from it
                for n in layers:
                    saes[n].b_dec.copy_(first[self._target(n) or n].mean(0))
                    if c.transcode:  # and centre the pre-activations on the input's mean, as sparsify does
                        saes[n].b_enc.copy_(-saes[n].W_enc @ first[n].mean(0))
        if self.dist.writes_files:
            atomic_write_text(self.out / "config.json", json.dumps(c.to_dict(), indent=2) + "\n")
        metrics = MetricsLog(self.dist.metrics_path(self.out / "metrics.jsonl"), resume_step=step if step else None)

        stream = train.batches(micro, seed=c.seed, start=pos, group_shards=c.group_shards, normalize=c.normalize,
                               device=self.device)
        for sae in saes.values():
            sae.train()
        bar = tqdm(total=total, initial=step, unit="step", desc="train", disable=not c.progress, dynamic_ncols=True)
        t_log, timed = time.perf_counter(), 0  # for tokens/s: steps done in this process since the last log row
        while step < total:
            lr = c.lr * lr_factor(step, total, c.warmup_steps, c.decay_frac, c.lr_decay)
            weight = sparsity_factor(step, total, c.sparsity_warmup)
            for _ in range(c.grad_accum):
                batch = next(stream)
                pos += micro
                for n in layers:
                    for group in opts[n].param_groups:
                        group["lr"] = lr
                    y = batch[self._target(n)] if c.transcode else None
                    if fused:
                        out = opts[n].step_fused(batch[n], weight, target=y)
                    else:
                        with autocast:
                            # the distributed wrappers take x only (they refuse transcoders at config time)
                            out = saes[n](batch[n]) if y is None else saes[n](batch[n], target=y)
                        (training_loss(saes[n], out, weight) / c.grad_accum).backward()
                    acc = sums[n]
                    for key in ("loss", "fvu", "l0", "aux_loss", "l1", "mse"):  # on the device: no sync per step
                        acc[key] = acc.get(key, 0.0) + getattr(out, key).detach().float() / c.grad_accum
            for n in layers if not fused else ():
                sae, opt = saes[n], opts[n]
                if sae.unit_norm_decoder:
                    sae.remove_parallel_grad_()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sae.unit_norm_decoder:
                    sae.normalize_decoder_()
            step += 1
            since += 1
            timed += 1
            bar.update(1)
            if step % c.log_every == 0 or step == total:
                raise_if_nonfinite()
                elapsed = time.perf_counter() - t_log
                tok_s = timed * c.batch_tokens / max(elapsed, 1e-9)
                rows = []
                for n in layers:
                    row = {"step": step, "tokens": step * c.batch_tokens, "layer": n, "lr": lr,
                           **{k: float(v) / since for k, v in sums[n].items()},
                           "dead_pct": 100.0 * float(saes[n].dead_mask.float().mean()), "tok_per_s": round(tok_s)}
                    metrics.write(row)
                    rows.append(row)
                mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "fvu", "l0", "dead_pct")}
                bar.set_postfix_str(f"{tok_s:,.0f} tok/s loss {mean['loss']:.4f} FVU {mean['fvu']:.4f} "
                                    f"L0 {mean['l0']:.1f} dead {mean['dead_pct']:.1f}%")
                sums = {n: {} for n in layers}
                since, timed, t_log = 0, 0, time.perf_counter()
                self._check_finite(step, saes, rows, ckpt_root)
            if step % c.checkpoint_every == 0 or step == total:
                self._check_finite(step, saes, [], ckpt_root)  # never checkpoint non-finite weights
                log_sums = {n: {k: float(v) for k, v in row.items()} for n, row in sums.items()}
                state = {"data_position": pos, "tokens": step * c.batch_tokens, "log_sums": log_sums,
                         "log_since": since, "total_steps": total, "config": c.to_dict()}
                self.dist.save_checkpoint(ckpt_root, step, state, saes, opts, scales, c.keep_checkpoints)
        bar.close()
        return self.dist.finish(self._finish, saes, evals, scales, step, total)

    def _check_finite(self, step: int, saes: dict, rows: list, ckpt_root: Path) -> None:
        """Stop at the first non-finite loss or weight (checked at logging and checkpoint steps only: one
        host sync there, none per step), keeping the last good checkpoint."""
        bad = [f"layer {r['layer']}: loss {r['loss']}" for r in rows if not math.isfinite(r["loss"])]
        for n, sae in saes.items():
            bad += [f"layer {n}: {name} not finite" for name, p in sae.named_parameters()
                    if not bool(torch.isfinite(p).all())]
        if not bad:
            return
        kept = list_checkpoints(ckpt_root)
        c = self.cfg
        cause = (f"--lr {c.lr:g} is far too high (try 1e-3)" if c.lr > 0.1 else
                 "a learning rate too high for this data (try a lower --lr), or non-finite activations")
        raise TrainingDiverged(
            f"training diverged at step {step} ({'; '.join(bad[:3])}); likely cause: {cause}. "
            + (f"The last good checkpoint, {kept[-1]}, is kept" if kept else "No checkpoint was written before it"))

    def _check_held_out(self, evals: ActivationStore) -> None:
        """Non-finite held-out activations would make the final FVU NaN: fail now, not after training."""
        if not evals.n_rows:
            return
        where = f" (cache {self.cfg.cache_dir})" if self.cfg.cache_dir else ""
        for n, x in evals.all().items():
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(f"the held-out activations of layer {n!r} have {bad} non-finite values{where}: the "
                                 "model gives NaN or inf there; check the model's weights and dtype (--cache-dtype)")

    # ------------------------------------------------------------------ evaluation and outputs
    @torch.no_grad()
    def evaluate(self, sae: SparseAutoencoder, x: torch.Tensor, batch: int = 4096, y: torch.Tensor | None = None) -> dict:
        """FVU over the whole held-out set (one variance, not a mean of batch FVUs) and mean L0; for a Matryoshka
        SAE also each prefix's FVU, ``prefix_fvu`` {width: FVU}. A transcoder is scored against its target ``y``."""
        was_training = sae.training
        sae.eval()
        err = l0 = 0.0
        widths = sae.cfg.matryoshka
        prefix_err = torch.zeros(len(widths or ()), dtype=torch.float64)
        for s in range(0, x.shape[0], batch):
            xb = x[s:s + batch]
            yb = None if y is None else y[s:s + batch]
            out = sae(xb) if yb is None else sae(xb, target=yb)
            err += float((out.x_hat.float() - (xb if yb is None else yb)).pow(2).sum())
            l0 += float((out.values > 0).sum())
            if widths:
                p = prefix_reconstructions(out.values, out.indices, sae.W_dec, sae.b_dec, widths, out.x_hat)
                prefix_err += (p.float() - xb).pow(2).sum((1, 2)).double().cpu()
        sae.train(was_training)
        t = x if y is None else y
        var = max(float((t - t.mean(0)).pow(2).sum()), 1e-30)
        result = {"fvu": err / var, "l0": l0 / x.shape[0]}
        if widths:
            result["prefix_fvu"] = {str(m): float(e) / var for m, e in zip(widths, prefix_err)}
        return result

    def _export(self, saes: dict, scales: dict) -> None:
        c = self.cfg
        if c.export == "saelens":
            for n, sae in saes.items():
                save_saelens(sae, self.out / "export" / "saelens" / n, act_scale=scales[n],
                             target_scale=scales[self._target(n)] if c.transcode else None,
                             metadata={"model_name": c.model or DEFAULT_MODEL_NAME, "hook_name": n})
        if c.export == "sparsify":
            save_sparsify(saes, self.out / "export" / "sparsify", act_scale={n: scales[n] for n in saes},
                          target_scale={n: scales[self._target(n)] for n in saes} if c.transcode else None)

    def _finished(self, ckpt) -> dict:
        """--resume on a finished run: nothing to train; write an --export it did not have yet."""
        self.log(f"the run in {self.out} has already finished ({ckpt.meta['step']} steps): nothing to resume")
        if self.cfg.export != "none" and not (self.out / "export" / self.cfg.export).exists():
            self.log(f"writing the --export {self.cfg.export} it did not have")
            self._export(ckpt.saes, {**ckpt.meta["scales"], **ckpt.meta.get("target_scales", {})})
        return {**json.loads((self.out / "summary.json").read_text()), "finished_before": True}

    def _finish(self, saes: dict, evals: ActivationStore, scales: dict, step: int, total: int) -> dict:
        c = self.cfg
        held_out = evals.all() if evals.n_rows else None
        summary = {"steps": step, "tokens": step * c.batch_tokens, "backend": ops.get_backend(self.device).name,
                   "model": model_id(c.model), "excluded": evals.stats, "layers": {}}
        for n, sae in saes.items():
            final = {"d_in": sae.d_in, "n_latents": sae.n_latents, "activation_scale": scales[n],
                     "dead_pct": 100.0 * float(sae.dead_mask.float().mean())}
            t = self._target(n)
            if t is not None:
                final.update(d_out=sae.d_out, target_scale=scales[t])
            if held_out is not None:
                x = held_out[n].to(self.device, torch.float32) * scales[n]
                y = None if t is None else held_out[t].to(self.device, torch.float32) * scales[t]
                final.update(self.evaluate(sae, x, y=y), eval_tokens=x.shape[0])
            folder = self.out / "sae" / n
            save_sae(sae, folder, metadata={"model": model_id(c.model), "hook": n})
            save_normalization(folder, n, scales[n], sae.d_in, target_scale=None if t is None else scales[t])
            summary["layers"][n] = final
        self._export(saes, scales)
        targets = {n: scales[self._target(n)] for n in saes} if c.transcode else None
        spliced = splice_eval(c, saes, scales, self.device, self.log, target_scales=targets)  # causal LMs only
        for n, m in (spliced or {}).items():
            summary["layers"][n]["spliced"] = m
            atomic_write_text(self.out / "sae" / n / "eval.json", json.dumps(m, indent=2) + "\n")
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if c.plot:
            try:
                summary["plot"] = str(plot_curves(self.out / "metrics.jsonl", self.out / "curves.png",
                                                  title=f"{c.model or DEFAULT_MODEL_NAME} | {c.activation}",
                                                  held_out={n: m.get("fvu") for n, m in summary["layers"].items()},
                                                  show_loss=c.activation not in _DECODER_UNIT_NORM or c.transcode))
            except ImportError:
                self.log("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return summary
