"""Backend implementations of the sparse kernel interface (see base.py). ops.py registers and chooses them."""
