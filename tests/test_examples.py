"""The examples run as documented (at reduced size) and do what they say."""
import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_loop_learns_on_real_activations(capsys):
    result = _load("train_loop").main(["--tokens", "8000", "--steps", "60", "--n-latents", "768", "--k", "16"])
    assert result["l0"] == 16.0
    assert result["fvu"] < 0.6, result  # from ~0.9 at the first step
    assert "held-out FVU" in capsys.readouterr().out


def test_inspect_and_steer_reads_features_and_moves_the_embedding(tmp_path, capsys):
    result = _load("inspect_and_steer").main(["--sae", str(tmp_path / "none"), "--tokens", "3000",
                                              "--train-steps", "40"])
    out = capsys.readouterr().out
    assert "training a small one" in out and "neighbours:" in out and "features on" in out
    assert result["max_activation"] > 0
    assert result["after"] != result["before"]  # the clamp reached the model's output


def test_steer_smollm2_finds_a_readable_feature_and_measures_the_clamp(tmp_path, capsys, smollm2):
    result = _load("steer_smollm2").main(["--sae", str(tmp_path / "none"), "--tokens", "2000", "--train-tokens",
                                          "2500", "--train-steps", "20", "--max-new-tokens", "4"], loaded=smollm2)
    out = capsys.readouterr().out
    assert "a readable feature" in out and "neighbour" in out and "re-measured" not in out
    assert result["max_activation"] > 0 and result["word"].isalpha()
    assert result["steered"] != result["baseline"]  # the 5x clamp changed the continuation


def test_vision_features_trains_on_patches_and_finds_top_patches(tmp_path, capsys):
    png = tmp_path / "grid.png"
    result = _load("vision_features").main(["--images", "4", "--steps", "60", "--n-latents", "128", "--show", "2",
                                            "--png", str(png)])
    out = capsys.readouterr().out
    assert "randomly initialised" in out and "patch row" in out
    assert result["fvu"] < 0.5, result  # from ~0.8 at the first step
    assert len(result["latents"]) == 2 and png.stat().st_size > 10_000
    for hits in result["top"]:
        assert all(0 <= r < 6 and 0 <= c < 6 and 0 <= i < len(result["labels"]) and v > 0 for i, r, c, v in hits)
        assert [v for *_, v in hits] == sorted((v for *_, v in hits), reverse=True)
