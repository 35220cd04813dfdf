"""Every bad CLI argument: exit code 2, one line naming the option, and (where the argument allows) before the
model is loaded (the model loader is replaced by one that fails the test)."""
import time
from pathlib import Path

import pytest
import torch
from hf_tiny import tiny_model_dir, write_corpus

import sae_fast.activations
from sae_fast import SparseAutoencoder, dispatch
from sae_fast.activations import default_model_path
from sae_fast.cli import build_parser, main
from sae_fast.train import trainer as trainer_module

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "a_file").write_text("x")
    SparseAutoencoder(16, 64, "topk", k=4).save(root / "sae")
    return root


def _cases(root):
    f, sae = str(root / "a_file"), str(root / "sae")
    train = [
        (["--device", "foo"], "--device 'foo' is not a device"),
        (["--device", "mps"], "--device 'mps' is not supported for training"),
        (["--device", "meta"], "--device 'meta' is not supported for training"),
        (["--epochs", "inf"], "--epochs must be a finite number > 0; got inf"),
        (["--lr", "inf"], "--lr must be a finite number > 0; got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0; got nan"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--l1-coeff", "nan"], "--l1-coeff must be a finite number >= 0; got nan"),
        (["--aux-coeff", "-1"], "--aux-coeff must be a finite number >= 0; got -1.0"),
        (["--k-aux", "-1"], "--k-aux must be an integer >= 0 (0 turns AuxK off); got -1"),
        (["--k", "0"], "--k must be a positive integer; got 0"),
        (["--k", "2.5"], "argument --k: invalid int value: '2.5'"),
        (["--k", "80", "--n-latents", "64"], "--k 80 is more than --n-latents 64"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--batch-tokens", "0"], "--batch-tokens must be a positive integer"),
        (["--eval-tokens", "-1"], "--eval-tokens must be an integer >= 0"),
        (["--decay-frac", "2"], "--decay-frac must be in [0, 1]"),
        (["--backend", "foo"], "--backend 'foo': backend 'foo' is not available here"),
        (["--out", f], "--out '" + f + "' is a file; pass a folder"),
        (["--out", "/dev/null/x"], "--out '/dev/null/x' is below /dev/null, which is not a folder"),
        (["--cache-dir", f], "--cache-dir '" + f + "' is a file"),
        (["--out", ""], "--out must be a non-empty string"),
        (["--activation", "tanh"], "argument --activation: invalid choice: 'tanh'"),
    ]
    if NO_GPU:
        train += [(["--device", "cuda"], "--device 'cuda': no CUDA GPU is available here"),
                  (["--device", "cuda:3"], "--device 'cuda:3': no CUDA GPU is available here")]
    if "triton" not in dispatch.available_backends() or not dispatch.lookup_backend("triton").supports(torch.device("cpu")):
        train += [(["--backend", "triton"], "--backend 'triton'")]  # on CPU only under TRITON_INTERPRET=1
    features = [
        (["--latents", "99999", "--sae", sae], "--latents 99999 is out of range: the SAE has 64 latents"),
        (["--latents", "1,x", "--sae", sae], "--latents must be comma-separated integers"),
        (["--top", "0", "--sae", sae], "--top must be >= 1; got 0"),
        (["--tokens", "0", "--sae", sae], "--tokens must be >= 1; got 0"),
        (["--count", "0", "--sae", sae], "--count must be >= 1"),
        (["--out", "/dev/null/site", "--sae", sae], "--out '/dev/null/site/index.html': /dev/null is not a folder"),
        (["--out", str(Path(sae) / "cfg.json"), "--sae", sae], "is a file; pass a folder for the site"),
    ]
    steer = [
        (["--model", str(default_model_path()), "--sae", sae, "--latent", "1"],
         "is BertModel, not a causal language model"),
        (["--model", "m", "--sae", sae, "--latent", "1", "--value", "nan"], "--value must be a finite number; got nan"),
        (["--model", "m", "--sae", sae, "--latent", "1", "--factor", "inf"], "--factor must be a finite number"),
        (["--model", "m", "--sae", sae, "--latent", "1", "--tokens", "0"], "--tokens must be >= 1"),
        (["--model", "m", "--sae", sae, "--latent", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ]
    demo = [
        (["--k", "0"], "--k must be >= 1; got 0"),
        (["--k", "600"], "--k 600 is more than --n-latents 512"),
        (["--d", "0"], "--d must be >= 1; got 0"),
        (["--batch", "0"], "--batch must be >= 1; got 0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "nan"], "--lr must be a finite number"),
    ]
    return ([("train", a, m) for a, m in train] + [("features", a, m) for a, m in features]
            + [("steer", a, m) for a, m in steer] + [("demo", a, m) for a, m in demo])


CASES = _cases(__import__("pathlib").Path("ROOT"))  # ids only; the real paths come from the fixture


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c}:{' '.join(a)}" for c, a, _ in CASES])
def test_bad_argument_is_one_line_before_the_model_loads(files, i, monkeypatch, capsys):
    command, args, message = _cases(files)[i]

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the argument was checked")

    monkeypatch.setattr(trainer_module, "load_model", no_model)
    monkeypatch.setattr(sae_fast.activations, "load_model", no_model)
    t0 = time.perf_counter()
    try:
        rc = main([command, *args, "--quiet"] if command == "demo" else [command, *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    took = time.perf_counter() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"sae-fast {command}: error: ") and message in err[0], err[0]
    # The real proof of 'early' is no_model above; this only guards against a scan or a collection (tens of
    # seconds) sneaking in, with room for a loaded CI machine's first imports.
    assert took < 30.0, took


def test_k_larger_than_the_layer_allows_is_refused_before_collecting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "collect_text", lambda *a, **k: pytest.fail("activations were collected"))
    args = ["train", "--model", str(tiny_model_dir("gpt2")), "--layer", "h.1", "--corpus",
            str(write_corpus(tmp_path / "c")), "--k", "5000", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 2
    assert "--k 5000 is more than the 256 latents of layer 'h.1' (--expansion 8 x width 32)" in capsys.readouterr().err


def test_bench_writes_to_the_current_directory_by_default():
    assert build_parser().parse_args(["bench"]).out == "sae-fast-bench"
