"""Backend implementations of the sparse kernel interface (see base.py). dispatch.py registers and chooses them."""
