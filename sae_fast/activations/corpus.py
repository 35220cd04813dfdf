"""Text corpora and their cutting into fixed-length token windows for a model's own tokenizer.

The embedded default corpus is real text that ships with every Python: the documentation topics in
``pydoc_data.topics`` (prose) interleaved with standard-library source files (code).
"""
from __future__ import annotations

import json
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}


def stdlib_sources(seed: int = 0) -> list[Path]:
    """The standard library's own .py files (tests and installed packages left out), in a fixed shuffled order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    random.Random(seed).shuffle(files)
    return files


def default_corpus(max_chars: int | None = None) -> Iterator[str]:
    """Python's documentation topics and standard-library sources, alternating prose and code documents,
    up to ``max_chars`` characters in all (all of them when None)."""
    from pydoc_data.topics import topics

    prose = [topics[k] for k in sorted(topics)]
    code = stdlib_sources()
    total = 0
    for i in range(max(len(prose), len(code))):
        for pool in (prose, code):
            if i >= len(pool):
                continue
            text = pool[i] if isinstance(pool[i], str) else pool[i].read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


def _read_file(path: Path, piece_chars: int = 1 << 20) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"{path}:{i + 1}: each JSONL line must be an object with a 'text' string")
                    yield row["text"]
        return
    with path.open(encoding="utf-8", errors="replace") as f:  # big files in ~1 MB pieces cut at line ends
        while True:
            piece = f.read(piece_chars)
            if not piece:
                return
            piece += f.readline()
            yield piece


def read_corpus(path) -> Iterator[str]:
    """Documents from a text file (.txt .md .rst .py: one document, read in ~1 MB pieces; .jsonl: the 'text'
    field of each line) or from every such file under a folder (sorted), streamed: nothing is held whole."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"corpus folder {str(path)!r} has no {'/'.join(sorted(TEXT_SUFFIXES))} files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"corpus {str(path)!r} does not exist; pass a text file, a .jsonl file or a folder "
                         "(or leave --corpus out for the embedded default)")
    for f in files:
        yield from _read_file(f)


def special_tokens(tokenizer, prepend_bos: bool = True) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special token ids the tokenizer puts around a text ([CLS]/[SEP], <s>, none).
    With ``prepend_bos``, a tokenizer that adds nothing in front but has a BOS token (SmolLM2, GPT-2) gets
    it: a causal LM otherwise turns the window's first real token into its attention sink."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    prefix, suffix = [], []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            break
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and not prefix and isinstance(bos, int):
        prefix = [bos]
    return prefix, suffix


def encode_prompt(tokenizer, text: str, prepend_bos: bool = True) -> dict:
    """``{"input_ids", "attention_mask"}`` (1, T) for one text, wrapped like a training window (BOS included)."""
    prefix, suffix = special_tokens(tokenizer, prepend_bos)
    ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def token_windows(tokenizer, texts: Iterable[str], ctx_len: int, docs_per_call: int = 64,
                  prepend_bos: bool = True) -> Iterator[tuple[list[int], int, int]]:
    """Cut each document into windows of at most ``ctx_len`` tokens, each wrapped in the tokenizer's own
    special tokens like a normal input (and a BOS, see ``special_tokens``). Yields (ids, n_prefix, n_suffix)."""
    prefix, suffix = special_tokens(tokenizer, prepend_bos)
    body = ctx_len - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"ctx_len={ctx_len} leaves no room next to the tokenizer's {len(prefix) + len(suffix)} "
                         "special tokens")
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and ctx_len > model_max:
        raise ValueError(f"ctx_len={ctx_len} is longer than the model's maximum of {model_max} tokens")
    batch: list[str] = []

    def flush():
        # verbose=False: documents longer than the model's limit are fine here, they get cut below.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            for s in range(0, len(ids), body):
                yield prefix + ids[s:s + body] + suffix, len(prefix), len(suffix)

    for text in texts:
        batch.append(text)
        if len(batch) == docs_per_call:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def window_batches(tokenizer, texts: Iterable[str], ctx_len: int, batch_size: int, seed: int = 0,
                   exclude_special: bool = True, block: int = 4096,
                   prepend_bos: bool = True) -> Iterator[tuple[dict, torch.Tensor]]:
    """Model inputs ``{"input_ids", "attention_mask"}`` (B, T) and a ``keep`` mask (B, T): the token
    positions whose activations are used (not padding; not special tokens when ``exclude_special``).

    Windows are gathered in blocks of ``block``; in each block full-length windows come first in a seeded
    shuffled order, then the shorter ones sorted by length, so batches carry almost no padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = token_windows(tokenizer, texts, ctx_len, prepend_bos=prepend_bos)
    rng = random.Random(seed)
    done = False
    while not done:
        chunk = []
        for w in windows:
            chunk.append(w)
            if len(chunk) == block:
                break
        else:
            done = True
        full = [w for w in chunk if len(w[0]) == ctx_len]
        rng.shuffle(full)
        short = sorted((w for w in chunk if len(w[0]) < ctx_len), key=lambda w: -len(w[0]))
        ordered = full + short
        for s in range(0, len(ordered), batch_size):
            group = ordered[s:s + batch_size]
            T = max(len(ids) for ids, _, _ in group)
            input_ids = torch.full((len(group), T), pad, dtype=torch.long)
            attention = torch.zeros(len(group), T, dtype=torch.long)
            keep = torch.zeros(len(group), T, dtype=torch.bool)
            for r, (ids, n_pre, n_suf) in enumerate(group):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                attention[r, :len(ids)] = 1
                lo, hi = (n_pre, len(ids) - n_suf) if exclude_special else (0, len(ids))
                keep[r, lo:hi] = True
            yield {"input_ids": input_ids, "attention_mask": attention}, keep
