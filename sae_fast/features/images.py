"""Features on images: each latent's top-activating patches over a stream of (image, patch) activations, in
memory bounded by the dictionary (n x top), never images x patches x n.

    acts = capture(vision_model, layer, pixel_values=x)[layer][:, 1:]     # (images, patches, d): CLS dropped
    found = features.top_patches(sae, [acts], grid=(6, 6), scale=scale)   # any iterable of such batches
    found.show(latent, names)                                             # image name, patch row / col, value
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .stats import merge_top


@dataclass
class TopPatches:
    """Per latent: its strongest patches (value, image number, patch number) and how many patches it fired on."""
    n_images: int
    n_patches: int          # patches seen in all (images x patches per image)
    grid: tuple[int, int]   # patch rows, patch columns of each image
    count: Tensor           # (n,) patches on which the latent fired
    values: Tensor          # (n, top) strongest activations, -inf where fewer were seen
    image: Tensor           # (n, top) image number (in stream order), -1 where none
    patch: Tensor           # (n, top) patch number in its image (row-major), -1 where none

    @property
    def density(self) -> Tensor:
        """(n,) fraction of patches on which each latent fired."""
        return self.count.double() / max(self.n_patches, 1)

    def rows_cols(self, latent: int) -> list[tuple[int, int, int, float]]:
        """(image, patch row, patch column, activation) of the latent's top patches, strongest first."""
        if not (isinstance(latent, int) and 0 <= latent < self.count.numel()):
            raise ValueError(f"latent must be an integer in [0, {self.count.numel()}); got {latent!r}")
        cols = self.grid[1]
        keep = self.image[latent] >= 0
        return [(int(i), int(p) // cols, int(p) % cols, float(v))
                for i, p, v in zip(self.image[latent][keep], self.patch[latent][keep], self.values[latent][keep])]

    def show(self, latent: int, names: list[str] | None = None) -> str:
        """One line per top patch: image (its name when given), patch row / column, activation."""
        lines = [f"latent {latent}: fired on {int(self.count[latent])} of {self.n_patches} patches"]
        for i, r, c, v in self.rows_cols(latent):
            lines.append(f"  {names[i] if names else i}  patch row {r} col {c}  {v:.3f}")
        return "\n".join(lines)


def top_patches(sae, batches: Iterable[Tensor], grid: tuple[int, int], top: int = 8, scale: float = 1.0) -> TopPatches:
    """Stream batches of patch activations (images, rows * cols, d_in) through the SAE's fused encoder and keep
    each latent's ``top`` strongest patches. ``scale`` multiplies the activations (the SAE's training scale)."""
    if not (isinstance(top, int) and top >= 1):
        raise ValueError(f"top must be a positive integer; got {top!r}")
    if not (len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be (patch rows, patch columns) of positive integers; got {grid!r}")
    per_image = grid[0] * grid[1]
    n = sae.n_latents
    count = torch.zeros(n, dtype=torch.long)
    best_v = torch.full((n, top), -float("inf"))
    best_i, best_p = torch.full((n, top), -1, dtype=torch.long), torch.full((n, top), -1, dtype=torch.long)
    n_images = 0
    for acts in batches:
        if acts.dim() != 3 or acts.shape[1] != per_image or acts.shape[2] != sae.d_in:
            raise ValueError(f"a batch must be (images, {per_image} patches, {sae.d_in}); got {tuple(acts.shape)}")
        b = acts.shape[0]
        with torch.no_grad():
            values, indices = sae.encode(acts.reshape(-1, sae.d_in).to(sae.W_dec) * scale)
        values, indices = values.float().cpu(), indices.long().cpu()
        if torch.isnan(values).any():  # never let NaN pass as "did not fire"
            raise ValueError("the SAE gave NaN activations (NaN in the patch activations or the SAE weights)")
        live = values > 0
        flat = torch.arange(b * per_image).unsqueeze(1).expand_as(indices)[live]
        lat, val = indices[live], values[live]
        count += torch.bincount(lat, minlength=n)
        merge_top(best_v, [best_i, best_p], lat, val, [flat // per_image + n_images, flat % per_image])
        n_images += b
    if not n_images:
        raise ValueError("batches gave no images")
    return TopPatches(n_images, n_images * per_image, tuple(grid), count, best_v, best_i, best_p)
