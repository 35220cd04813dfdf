"""pytest set-up only: Triton's mode and the report header. Shared test helpers live in helpers.py."""
import os

import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
# chosen before triton is first imported (it never becomes the default backend for CPU tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sae_fast  # noqa: E402


def pytest_report_header(config):
    return f"sae_fast backends: {', '.join(sae_fast.available_backends())}; torch {torch.__version__}"
