"""SAE folders on disk, whatever their format: the files, the registry of formats, and run folders.

Every format keeps an SAE as a folder holding a JSON config (``cfg.json``) and a safetensors weights
file; nothing is ever unpickled. This module reads and writes those two files with clear errors, writes
folders atomically, and dispatches a folder to the format that claims it. The formats register
themselves: sae-fast's own in ``sae_fast.sae``, SAELens and sparsify in ``sae_fast.io`` (imported by
``sae_fast``). It imports no other sae_fast module, so ``sae.py`` can use it without an import circle.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "cfg.json"


# ============================================================================ the two files
def write_weights_and_config(folder: Path, tensors: dict, weights_file: str, cfg: dict, indent=2) -> None:
    """The two files of an SAE folder in every format: safetensors weights and a JSON config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weights_file))
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=indent) + "\n")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def fsync_tree(root: Path, mode: int | None = None) -> None:
    """Flush every file under ``root`` and every folder's entries to the disk, so a rename that follows
    can never publish a folder whose files are still empty after a power loss. With ``mode``, files get
    that mode (safetensors creates its files 0600 whatever the umask)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def fsync_dir(folder) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the files themselves are synced
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError with ENOSPC, or safetensors' own error wrapping one (it does not keep the errno)."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) \
        or "StorageFull" in str(exc)


def disk_full_error(folder, need: int | None = None) -> OSError:
    """The one-line error for a write that ran out of space in ``folder``."""
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
    parts = [f"about {need / 2**20:,.1f} MiB needed" if need else "",
             f"{free / 2**20:,.1f} MiB free" if free is not None else ""]
    detail = "; ".join(p for p in parts if p)
    return OSError(errno.ENOSPC, f"no space left on the disk of {folder}" + (f" ({detail})" if detail else "")
                   + "; free some space or write elsewhere")


def atomic_write_text(path, text: str) -> Path:
    """Write a small text file by a synced temporary file and a rename: readers see the old or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_dir_write(path, write) -> Path:
    """Call ``write(tmp_dir)`` then move the finished folder into ``path``, so a crash never leaves a half
    written folder behind (an existing folder is replaced only after the new one is complete). The files
    and folders are fsynced before the rename and the parent after it; permissions follow the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the published folder is an ordinary one
        try:
            write(tmp)
            fsync_tree(tmp, 0o666 & ~umask)
        except (OSError, SafetensorError) as e:
            if is_disk_full(e):
                old_size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None
                raise disk_full_error(path.parent, old_size) from e
            raise
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def folder_of(path) -> Path:
    """Accept the folder itself or a file inside it (cfg.json, the weights)."""
    path = Path(path)
    if path.is_file():
        return path.parent
    return path


def read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror or e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(cfg).__name__}")
    return cfg


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU (safetensors never runs code, unlike pickle)."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def config_and_weights(path, weights_file: str, kind: str):
    """(folder, config path, weights path, parsed config) of an SAE folder; a clear error names the
    missing file."""
    path = folder_of(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / weights_file
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not {kind} SAE folder: missing {f.name}")
    return path, cfg_path, weights_path, read_json(cfg_path)


def take(tensors: dict, name: str, shape: tuple, file: Path, alias: str | None = None) -> torch.Tensor:
    """Pop tensor ``name`` checking its shape; errors name the tensor, the file and the expected shape."""
    if name not in tensors:
        raise ValueError(f"{file} has no tensor {name!r} (has: {', '.join(sorted(tensors)) or 'none'})")
    t = tensors.pop(name)
    if not t.is_floating_point():
        raise ValueError(f"tensor {name!r} in {file} must be floating point; got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} in {file} has shape {tuple(t.shape)}; expected {tuple(shape)}"
                         + (f" ({alias})" if alias else ""))
    return t


def no_leftovers(tensors: dict, file: Path, what: str) -> None:
    if tensors:
        raise ValueError(f"{file} has tensors this loader does not understand for {what}: "
                         f"{', '.join(sorted(tensors))}")


def parse_dtype(name, default: torch.dtype) -> torch.dtype:
    """A floating-point torch dtype from a dtype or its name (``"float32"``, ``"torch.bfloat16"``)."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    d = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype or its name; got {name!r}")
    return d


# ============================================================================ formats and detection
class FolderFormat(NamedTuple):
    """One way to keep an SAE in a folder."""
    name: str
    """What ``detect_format`` returns: 'sae-fast', 'saelens', 'sparsify'."""
    label: str
    """The name in error messages: 'sae-fast', 'SAELens', 'sparsify'."""
    weights_file: str
    """The safetensors file beside cfg.json."""
    claims: Callable[[dict], bool] | None
    """Given the parsed cfg.json: is the folder this format's (None: any folder with ``weights_file``)."""
    load: Callable
    """``load(folder, device=None, dtype=None)`` -> one SAE."""


FOLDER_FORMATS: dict[str, FolderFormat] = {}
"""Registered formats, tried in registration order (sae-fast first: sparsify shares its weights file)."""


def register_format(fmt: FolderFormat) -> None:
    FOLDER_FORMATS[fmt.name] = fmt


def _weights_files(prefix: str = "") -> str:
    """'sae.safetensors (sae-fast, sparsify) or sae_weights.safetensors (SAELens)', from the registry."""
    by_file: dict[str, list[str]] = {}
    for fmt in FOLDER_FORMATS.values():
        by_file.setdefault(fmt.weights_file, []).append(fmt.label)
    return " or ".join(f"{prefix}{file} ({', '.join(labels)})" for file, labels in by_file.items())


def _format_of(path: Path) -> FolderFormat:
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: expected {_weights_files(CONFIG_FILE + ' and ')} in it")
    cfg = None  # parsed only when a format asks for it
    for fmt in FOLDER_FORMATS.values():
        if (path / fmt.weights_file).is_file():
            if fmt.claims is None:
                return fmt
            cfg = read_json(path / CONFIG_FILE) if cfg is None else cfg
            if fmt.claims(cfg):
                return fmt
    raise FileNotFoundError(f"{path} has {CONFIG_FILE} but no weights: expected {_weights_files()}")


def detect_format(path) -> str:
    """'sae-fast', 'saelens' or 'sparsify' for an SAE folder (raises FileNotFoundError otherwise)."""
    return _format_of(folder_of(path)).name


# ============================================================================ run folders and the single entry
def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _sae_subfolders(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    weights = {fmt.weights_file for fmt in FOLDER_FORMATS.values()}
    subs = [p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()
            and any((p / w).is_file() for w in weights)]
    return sorted(subs, key=lambda p: _natural_key(p.name))


def load_folder_or_run(path, loader, hookpoint, **kwargs):
    """One SAE folder -> the SAE; a folder of SAE folders (a run, one per hookpoint) -> {name: SAE},
    or the one named by ``hookpoint``."""
    path = folder_of(path)
    if hookpoint is not None:
        sub = path / hookpoint
        if not (sub / CONFIG_FILE).is_file():
            names = [p.name for p in _sae_subfolders(path)]
            raise FileNotFoundError(f"no SAE for hookpoint {hookpoint!r} in {path}; "
                                    f"found: {', '.join(names) or 'none'}")
        return loader(sub, **kwargs)
    if (path / CONFIG_FILE).is_file() or not path.is_dir():
        return loader(path, **kwargs)
    subs = _sae_subfolders(path)
    if not subs:
        detect_format(path)  # raises the standard "not an SAE folder" error
    return {p.name: loader(p, **kwargs) for p in subs}


def _load_detected(path, **kwargs):
    return _format_of(folder_of(path)).load(path, **kwargs)


def load_sae(path, device=None, dtype=None, hookpoint: str | None = None):
    """Load an SAE folder in any supported format (sae-fast, SAELens, sparsify; detected from its files).

    A folder holding several SAE folders (a sparsify run: one per hookpoint) gives ``{name: SAE}``;
    ``hookpoint=`` picks one. ``dtype`` defaults to the stored one (SAELens: its cfg ``dtype``)."""
    return load_folder_or_run(path, _load_detected, hookpoint, device=device, dtype=dtype)
