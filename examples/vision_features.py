"""Features on images end to end: a small CLIP-style vision model, patch activations, an SAE, top patches.

The model is a transformers CLIPVisionConfig (hidden 64, 4 layers, 96 px images, 16 px patches: a 6 x 6 grid)
initialised at random, written with save_pretrained and read back with from_pretrained: no real image-text
weights ship in any package here, so the features show the pipeline working, not what they mean. Inputs are
the sample images bundled in scikit-image's wheel (skimage.data, nothing downloads), each as the centre square
and nine overlapping half-size crops, resized and normalised with plain torch. Patch tokens of the middle
block (CLS dropped) train a TopK SAE; features.top_patches streams them back and keeps each latent's top
patches, printed as image + patch row / column and drawn as a grid PNG. About 25 s on a loaded 2-core machine.

    python examples/vision_features.py [--images 15] [--steps 200] [--n-latents 256] [--k 8] [--png out.png]
"""
import argparse
import itertools
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import capture
from sae_fast.activations.hooks import middle_layer

IMAGES = ["astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "hubble_deep_field", "immunohistochemistry",
          "moon", "brick", "grass", "gravel", "text", "page", "retina"]
# CLIP's published per-channel pixel mean and std (what CLIPImageProcessor normalises with).
MEAN, STD = torch.tensor([0.4815, 0.4578, 0.4082]), torch.tensor([0.2686, 0.2613, 0.2758])


def views(name: str, size: int) -> tuple[list[str], list[tuple[int, int, int]], torch.Tensor]:
    """The image's centre square and nine overlapping half-size crops of it, each resized to size x size:
    (labels, boxes (top, left, side) in the original pixels, pixel values (10, 3, size, size))."""
    from skimage import data
    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    x = torch.from_numpy(img[..., :3].astype(np.float32) / (255.0 if img.dtype == np.uint8 else img.max()))
    h, w = x.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    boxes = [(top, left, side)] + [(top + r * side // 4, left + c * side // 4, side // 2)
                                   for r in range(3) for c in range(3)]
    labels = [f"{name}"] + [f"{name}[crop {r},{c}]" for r in range(3) for c in range(3)]
    crops = [x[t:t + s, lft:lft + s].permute(2, 0, 1)[None] for t, lft, s in boxes]
    px = torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                    for c in crops])
    return labels, boxes, (px.clamp(0, 1) - MEAN[:, None, None]) / STD[:, None, None]


def draw(path, found, latents, pixels, labels, patch, per_row=6):
    """One row per latent: its top patches' images with the patch outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(latents), per_row, figsize=(1.6 * per_row, 1.8 * len(latents)), squeeze=False)
    for ax_row, latent in zip(axes, latents):
        hits = found.rows_cols(latent)[:per_row]
        for j, ax in enumerate(ax_row):
            ax.axis("off")
            if j >= len(hits):
                continue
            i, r, c, v = hits[j]
            ax.imshow((pixels[i] * STD[:, None, None] + MEAN[:, None, None]).clamp(0, 1).permute(1, 2, 0).numpy())
            ax.add_patch(plt.Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, color="red", lw=2))
            ax.set_title(f"{labels[i]}\n({r},{c}) {v:.2f}", fontsize=6)
        ax_row[0].text(-0.15, 0.5, f"latent {latent}", transform=ax_row[0].transAxes, rotation=90, va="center",
                       ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=len(IMAGES), help=f"skimage.data images to use (default {len(IMAGES)})")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of 512 patches (default 200)")
    ap.add_argument("--n-latents", type=int, default=256, help="dictionary size (default 256)")
    ap.add_argument("--k", type=int, default=8, help="active latents per patch (default 8)")
    ap.add_argument("--show", type=int, default=4, help="latents to print and draw (default 4)")
    ap.add_argument("--png", default="vision_features.png", help="grid of top patches (default vision_features.png)")
    args = ap.parse_args(argv)
    if not 1 <= args.images <= len(IMAGES):
        raise SystemExit(f"--images must be in [1, {len(IMAGES)}]; got {args.images}")
    torch.manual_seed(0)

    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=96, patch_size=16)
    with tempfile.TemporaryDirectory() as folder:  # the from_pretrained path a real checkpoint takes
        CLIPVisionModel(cfg).save_pretrained(folder)
        model = CLIPVisionModel.from_pretrained(folder).eval()
    print(f"CLIPVisionModel, randomly initialised ({sum(p.numel() for p in model.parameters()):,} parameters): "
          "the features show the pipeline, not meaning")

    labels, pixels = [], []
    for name in IMAGES[:args.images]:
        lab, _, px = views(name, cfg.image_size)
        labels += lab
        pixels.append(px)
    pixels = torch.cat(pixels)
    layer = middle_layer(model)
    grid = (cfg.image_size // cfg.patch_size,) * 2
    acts = capture(model, layer, pixel_values=pixels)[layer][:, 1:]  # (views, 36 patches, 64): CLS dropped
    print(f"{len(labels)} views of {args.images} images -> {layer} patch tokens {tuple(acts.shape)}")

    flat = acts.reshape(-1, acts.shape[-1])
    scale = (flat.shape[1] / flat.pow(2).sum(1).mean()).sqrt().item()  # mean squared norm d after scaling
    sae = SparseAutoencoder(d_in=flat.shape[1], n_latents=args.n_latents, activation="topk", k=args.k)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    epochs = (torch.randperm(flat.shape[0], generator=gen) for _ in itertools.count())
    order = itertools.chain.from_iterable(p.split(512) for p in epochs)
    for step, idx in enumerate(itertools.islice(order, args.steps)):
        out = sae(flat[idx] * scale)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if step % 100 == 0:
            print(f"step {step:4d}  FVU {out.fvu.item():.3f}  L0 {out.l0.item():.1f}")
    sae.eval()
    with torch.no_grad():
        fvu = sae(flat * scale).fvu.item()
    print(f"FVU on all {flat.shape[0]} patches {fvu:.3f}")

    found = features.top_patches(sae, acts.split(32), grid, top=8, scale=scale)  # streamed, 32 views a batch
    alive = int((found.count > 0).sum())
    # Latents to show: those firing on 0.5-20% of patches, strongest peak first.
    dens = found.density
    pick = [int(i) for i in torch.argsort(found.values[:, 0], descending=True) if 0.005 <= dens[i] <= 0.2][:args.show]
    print(f"{alive} of {args.n_latents} latents fired; top patches of {len(pick)}:")
    for latent in pick:
        print(found.show(latent, labels))
    if args.png:
        draw(args.png, found, pick, pixels, labels, cfg.patch_size)
        print(f"wrote {args.png}")
    return {"fvu": fvu, "alive": alive, "latents": pick, "top": [found.rows_cols(i) for i in pick],
            "labels": labels, "png": args.png}


if __name__ == "__main__":
    main()
