"""Write the static resource table of the Triton kernels (kernel x config x target: registers, spills,
shared memory, tensor-core instructions) to benchmarks/results/. No GPU needed: the kernels are compiled
for sm_80 and sm_90 with the triton wheel's compiler and read with its cuobjdump.

    python benchmarks/triton_resources.py   # -> benchmarks/results/triton_resources_triton-<version>.{md,json}

Exits non-zero when a launch spills, overflows shared memory, cannot fit an SM, or a GEMM kernel has
no tensor-core instructions. Triton's compile cache goes to a temporary directory.
"""
import os
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: this script compiles the kernels")
    with tempfile.TemporaryDirectory() as home:
        os.environ["TRITON_HOME"] = home  # the compile cache lives and dies here
        import triton

        from sae_fast.kernels import resources

        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"triton_resources_triton-{triton.__version__}"
        return resources.main(["--json", f"{stem}.json", "--markdown", f"{stem}.md", *sys.argv[1:]],
                              command=" ".join(["python benchmarks/triton_resources.py", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
