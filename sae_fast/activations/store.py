"""Activations stored as shards of rows (one row per token, one tensor per layer), in memory or on disk.

On disk a store is a folder of ``shard_00000.safetensors`` files (one tensor per layer, keyed by the
layer's name) plus ``meta.json``, written last, so a folder without it is an unfinished store. Reading
streams the shards in a seeded shuffled order: each epoch permutes the shards, takes them
``group_shards`` at a time and permutes the rows inside each group, so at most that many shards are in
memory and a corpus bigger than RAM works. A read position is one integer (rows consumed since the first
epoch began), so a resumed run continues exactly where it stopped.

Reading gives the rows as recorded (the model's own units), from ``all`` and ``batches`` alike;
``normalize=True`` multiplies each layer by its ``scales()`` factor. Normalisation (Anthropic, 2024):
activations scaled so their mean squared norm is ``d``; the store records the raw mean squared norm per
layer and ``scale = sqrt(d / mean_sq_norm)``. An SAE trained on scaled rows reads ``x * scale``; divide its
reconstruction by the scale to get back to the model's units (e.g. for steering).

Layers are keyed by module names as ``resolve_layers`` resolved them (``model.layers.15``). Every dict
the store returns (``scales``, ``all``, ``batches``, ``widths``) also takes the name one leading dotted part
shorter or longer (``layers.15``; ``transformer.h.6`` for ``h.6``): a name written with or without the
base model's prefix, as ``resolve_layers`` accepts it, finds the layer when only one layer fits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "sae-fast-activations"
META_FILE = "meta.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def normalization_scale(mean_sq_norm: float, d: int) -> float:
    """The factor that makes activations with this mean squared norm have mean squared norm ``d``."""
    return math.sqrt(d / mean_sq_norm) if mean_sq_norm > 0 else 1.0


def find_layer(key: str, names) -> str:
    """The one name in ``names`` that is ``key``, or ``key`` with one leading dotted part added or dropped
    (``layers.15`` -> ``model.layers.15``, ``transformer.h.6`` -> ``h.6``); KeyError otherwise."""
    hits = _layers_fitting(key, names)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise KeyError(f"{key!r} fits several layers: {', '.join(hits)}; name one in full")
    raise KeyError(f"no layer {key!r} in this store; it holds: {', '.join(names)}")


def _layers_fitting(key, names) -> list[str]:
    if not isinstance(key, str):
        return []
    if key in names:
        return [key]
    depth = key.count(".")
    return [n for n in names if (n.endswith("." + key) and n.count(".") == depth + 1)
            or (key.endswith("." + n) and n.count(".") == depth - 1)]


class LayerDict(dict):
    """``{layer: value}`` keyed by the store's layer names that also finds a layer by a name one leading
    dotted part shorter or longer (see ``find_layer``). Iteration gives the stored names."""

    def __missing__(self, key):
        return dict.__getitem__(self, find_layer(key, list(self)))

    def __contains__(self, key) -> bool:
        return len(_layers_fitting(key, list(self))) == 1

    def get(self, key, default=None):
        return self[key] if key in self else default


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class ActivationStore:
    """Rows of activations for one or more layers. Write with ``add`` then ``finish``; read with ``batches``
    (shuffled stream) or ``all`` (everything, for small evaluation sets). Both give the rows as recorded;
    ``normalize=True`` multiplies them by ``scales()``. Layer keys: see the module docstring."""

    def __init__(self, layers: list[str], folder=None, shard_tokens: int = 65536, dtype: str = "float32",
                 fingerprint: dict | None = None):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1; got {shard_tokens}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
        self.layers = list(layers)
        self.folder = Path(folder) if folder is not None else None
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.fingerprint = fingerprint or {}
        self.stats: dict = {}  # what the collection left out (collect_text); kept in meta.json
        self.widths: dict[str, int] = LayerDict()
        self.sizes: list[int] = []
        self.sum_sq = {name: 0.0 for name in self.layers}
        self._memory: list[dict[str, Tensor]] = []
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows = 0
        self.finished = False
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / META_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing
    def add(self, acts: dict[str, Tensor]) -> None:
        """Append rows: ``acts[layer]`` is (N, d_layer), the same N for every layer."""
        if self.finished:
            raise RuntimeError("the store is finished; open a new one to write more")
        rows = {acts[name].shape[0] for name in self.layers}
        if len(rows) != 1:
            raise ValueError(f"every layer must add the same number of rows; got {sorted(rows)}")
        for name in self.layers:
            t = acts[name]
            self.widths.setdefault(name, t.shape[1])
            if t.shape[1] != self.widths[name]:
                raise ValueError(f"layer {name!r} rows have width {t.shape[1]}, earlier ones {self.widths[name]}")
            self.sum_sq[name] += float(t.double().pow(2).sum())
        self._pending.append({name: acts[name].detach().to("cpu", DTYPES[self.dtype]) for name in self.layers})
        self._pending_rows += rows.pop()
        while self._pending_rows >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        cat = {name: torch.cat([p[name] for p in self._pending]) for name in self.layers}
        shard = {name: t[:n].contiguous() for name, t in cat.items()}
        rest = {name: t[n:] for name, t in cat.items()}
        self._pending_rows -= n
        self._pending = [rest] if self._pending_rows else []
        if self.folder is None:
            self._memory.append(shard)
        else:
            path = self.folder / f"shard_{len(self.sizes):05d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(shard, str(tmp))
            os.replace(tmp, path)
        self.sizes.append(n)

    def finish(self) -> ActivationStore:
        """Write the last (short) shard and, on disk, ``meta.json``, which marks the store complete."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self.finished = True
        if self.folder is not None:
            meta = {"format": FORMAT, "layers": self.layers, "widths": self.widths, "dtype": self.dtype,
                    "shards": self.sizes, "sum_sq": self.sum_sq, "fingerprint": self.fingerprint, "stats": self.stats}
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f, indent=1)
            os.replace(tmp, self.folder / META_FILE)
        return self

    @classmethod
    def open(cls, folder) -> ActivationStore | None:
        """The complete store in ``folder``, or None when there is none (or it was never finished)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT:
            return None
        store = cls.__new__(cls)
        store.layers, store.widths, store.dtype = meta["layers"], LayerDict(meta["widths"]), meta["dtype"]
        store.folder, store.sizes, store.sum_sq = folder, meta["shards"], meta["sum_sq"]
        store.fingerprint, store.shard_tokens = meta.get("fingerprint", {}), max(meta["shards"], default=1)
        store.stats = meta.get("stats", {})
        store._memory, store._pending, store._pending_rows, store.finished = [], [], 0, True
        if not all((folder / f"shard_{i:05d}.safetensors").is_file() for i in range(len(store.sizes))):
            return None
        return store

    # ------------------------------------------------------------------ reading
    @property
    def n_rows(self) -> int:
        return sum(self.sizes)

    def mean_sq_norm(self, layer: str) -> float:
        """Mean squared norm of ``layer``'s recorded rows (the name as ``scales()`` takes it)."""
        return self.sum_sq[find_layer(layer, self.layers)] / max(self.n_rows, 1)

    def scales(self) -> LayerDict:
        """Per layer, the factor that brings the mean squared norm to d (see the module docstring):
        ``scales()["layers.15"]`` and ``scales()["model.layers.15"]`` are the same number."""
        return LayerDict((n, normalization_scale(self.mean_sq_norm(n), self.widths[n])) for n in self.layers)

    def shard(self, i: int) -> dict[str, Tensor]:
        if self.folder is None:
            return self._memory[i]
        return load_file(str(self.folder / f"shard_{i:05d}.safetensors"))

    def all(self, normalize: bool = False) -> LayerDict:
        """Every row of every layer (for small stores, such as a held-out evaluation set), as recorded, or
        times ``scales()`` with ``normalize=True``. To feed held-out rows to an SAE trained on another store,
        multiply them by that store's ``scales()``, as ``sae-fast train`` does."""
        shards = [self.shard(i) for i in range(len(self.sizes))]
        rows = LayerDict((n, torch.cat([s[n] for s in shards])) for n in self.layers)
        if normalize:
            scales = self.scales()
            rows = LayerDict((n, t.to(torch.float32) * scales[n]) for n, t in rows.items())
        return rows

    def _groups(self, seed: int, epoch: int, group_shards: int) -> list[list[int]]:
        order = torch.randperm(len(self.sizes), generator=torch.Generator().manual_seed(_seed(seed, epoch))).tolist()
        return [order[i:i + group_shards] for i in range(0, len(order), group_shards)]

    def _chunks(self, seed: int, start: int, group_shards: int) -> Iterator[dict[str, Tensor]]:
        """Rows in stream order from position ``start`` on, one shuffled group at a time (forever)."""
        total = self.n_rows
        pos = start
        while True:
            epoch, offset = divmod(pos, total)
            base = 0
            for g, group in enumerate(self._groups(seed, epoch, group_shards)):
                size = sum(self.sizes[i] for i in group)
                if offset < base + size:
                    shards = [self.shard(i) for i in group]
                    perm = torch.randperm(size, generator=torch.Generator().manual_seed(_seed(seed, epoch, g)))
                    skip = offset - base
                    rows = perm[skip:]
                    yield {n: torch.cat([s[n] for s in shards])[rows] for n in self.layers}
                    del shards
                    pos += size - skip
                    offset = base + size
                base += size

    def batches(self, batch_size: int, seed: int = 0, start: int = 0, group_shards: int = 4,
                normalize: bool = False, device=None) -> Iterator[LayerDict]:
        """Endless stream of float32 batches ``{layer: (batch_size, d)}`` in shuffled order, starting at
        stream position ``start`` (rows; batch j covers rows [start + j*batch_size, ...)). Batches may
        span epochs. Rows as recorded, or times ``scales()`` with ``normalize=True`` (what an SAE is
        trained on). Memory: ``group_shards`` shards plus one batch."""
        if not self.n_rows:
            raise ValueError("the activation store is empty")
        if batch_size < 1 or group_shards < 1:
            raise ValueError(f"batch_size and group_shards must be >= 1; got {batch_size}, {group_shards}")
        scales = self.scales() if normalize else {n: 1.0 for n in self.layers}
        parts: list[dict[str, Tensor]] = []
        have = 0
        for chunk in self._chunks(seed, start, group_shards):
            n_chunk = chunk[self.layers[0]].shape[0]
            used = 0
            while used < n_chunk:
                take = min(batch_size - have, n_chunk - used)
                parts.append({n: t[used:used + take] for n, t in chunk.items()})
                used += take
                have += take
                if have == batch_size:
                    yield LayerDict((n, torch.cat([p[n] for p in parts]).to(device=device, dtype=torch.float32)
                                     * scales[n]) for n in self.layers)
                    parts, have = [], 0
