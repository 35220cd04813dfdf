"""Run a model over a corpus and keep the activations of some layers: the training data of an SAE."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from .corpus import window_batches
from .hooks import LayerCapture
from .sinks import sink_mask
from .store import ActivationStore


def _check_rows(name: str, out: torch.Tensor, keep: torch.Tensor, step: int, expected_width) -> torch.Tensor:
    if out.dim() != 3 or out.shape[:2] != keep.shape:
        raise ValueError(f"layer {name!r} returns shape {tuple(out.shape)} for inputs of shape {tuple(keep.shape)}; "
                         "expected one vector per token, (batch, seq, width): hook a module that outputs hidden "
                         "states, such as a whole transformer block")
    want = expected_width.get(name) if isinstance(expected_width, dict) else expected_width
    if want is not None and out.shape[-1] != want:
        raise ValueError(f"layer {name!r} outputs width {out.shape[-1]}, but {want} is expected here "
                         "(the SAE's d_in); hook the layer the SAE was made for")
    rows = out[keep.to(out.device)].float()
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"layer {name!r} produced NaN or inf activations in model batch {step}; check the "
                         "model's weights and dtype (float16 overflow is a common cause)")
    return rows


def collect_text(model, tokenizer, layers, texts: Iterable[str], *, ctx_len: int = 128, batch_size: int = 32,
                 max_tokens: int = 200_000, eval_tokens: int = 0, exclude_special: bool = True, seed: int = 0,
                 expected_width=None, folder=None, shard_tokens: int = 65536, dtype: str = "float32",
                 fingerprint: dict | None = None, progress: bool = True, sink_factor: float = 0.0,
                 transcode: bool = False) -> tuple[ActivationStore, ActivationStore]:
    """Activations of ``layers`` on ``texts``, as (train store, held-out eval store).

    The first ``eval_tokens`` kept tokens go to the eval store and the next ``max_tokens`` to the train
    store. Padding is never kept; special tokens ([CLS], [SEP], <s>, a prepended BOS) only when
    ``exclude_special`` is False; attention sinks (norm over ``sink_factor`` x the batch median, see
    ``sinks.py``) not when ``sink_factor > 0``. The counts of left-out tokens are in ``train.stats``.
    With ``folder`` the stores are written to ``folder/train`` and ``folder/eval`` as sharded
    safetensors (memory stays bounded); without it they live in memory. With ``transcode`` each module's
    input and output are kept, from the same forward pass (``hooks.TARGET_SUFFIX``)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    device = next(model.parameters()).device
    with LayerCapture(model, layers, transcode=transcode) as cap:
        names = cap.keys
        root = Path(folder) if folder is not None else None
        train = ActivationStore(names, root / "train" if root else None, shard_tokens, dtype, fingerprint)
        evals = ActivationStore(names, root / "eval" if root else None, max(eval_tokens, 1), dtype, fingerprint)
        want_eval, total = eval_tokens, eval_tokens + max_tokens
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="activations", disable=not progress)
        seen, special, sinks = 0, 0, 0
        batches = window_batches(tokenizer, texts, ctx_len, batch_size, seed=seed, exclude_special=exclude_special)
        for step, (inputs, keep) in enumerate(batches):
            outs = cap.run(**{k: v.to(device) for k, v in inputs.items()})
            special += int(inputs["attention_mask"].sum()) - int(keep.sum())
            sink = sink_mask({n: outs[n] for n in names}, keep, sink_factor)
            if bool(sink.any()):
                sinks += int(sink.sum())
                keep = keep & ~sink
            rows = {n: _check_rows(n, outs[n], keep, step, expected_width) for n in names}
            n_rows = next(iter(rows.values())).shape[0]
            take = min(n_rows, total - seen)
            to_eval = max(min(take, want_eval - seen), 0)
            if to_eval:
                evals.add({n: r[:to_eval] for n, r in rows.items()})
            if take > to_eval:
                train.add({n: r[to_eval:take] for n, r in rows.items()})
            seen += take
            bar.update(take)
            if seen >= total:
                break
        bar.close()
    if train.n_rows + train._pending_rows == 0:
        what = "no text at all" if seen == 0 else f"only {seen} tokens, all used for evaluation"
        raise ValueError(f"the corpus gave {what}: nothing to train on; pass a corpus with text in it "
                         "(or lower --eval-tokens)")
    stats = {"windows_tokens": special + sinks + seen, "special_excluded": special, "sinks_excluded": sinks,
             "sink_factor": sink_factor}
    train.stats, evals.stats = stats, stats
    return train.finish(), evals.finish()
