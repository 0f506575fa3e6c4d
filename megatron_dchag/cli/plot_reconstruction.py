"""Plot an MAE reconstruction from a checkpoint: original, masked and reconstructed false-colour
images plus one masked pixel's spectrum (original vs reconstruction).

Runs as one process at TP=1 whatever TP the checkpoint was trained with (it reshards on load):

    python tools/plot_reconstruction.py --load RUN_DIR --out reconstruction.png [--data-path DIR] [--index 0]

The model config is read from the checkpoint's ``config.yaml``; ``--data-path`` / ``--stats-file``
override where the cubes are. The image is a validation crop (or training crop with ``--split train``).
Installed as the console script ``dchag-plot-reconstruction`` with the same flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np


def _false_colour(cube: np.ndarray, wavelengths: Optional[np.ndarray], bands=(650.0, 550.0, 450.0)) -> np.ndarray:
    """``[C, H, W]`` -> ``[H, W, 3]`` in [0, 1] from the bands nearest to ``bands`` nm (R, G, B)."""
    c = cube.shape[0]
    if wavelengths is not None and len(wavelengths) == c:
        idx = [int(np.argmin(np.abs(wavelengths - b))) for b in bands]
    else:
        idx = [int(c * 0.75), int(c * 0.45), int(c * 0.1)]
    rgb = np.stack([cube[i] for i in idx], axis=-1)
    lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return np.clip((rgb - lo) / max(hi - lo, 1e-8), 0, 1)


def reconstruct(args) -> dict:
    import torch

    from megatron_dchag.data.hyperspectral.dataset import HyperspectralDataset
    from megatron_dchag.data.hyperspectral.statistics import load_channel_stats
    from megatron_dchag.distributed import destroy_distributed, initialize_distributed
    from megatron_dchag.models.mae import random_patch_mask
    from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask, mask_generator
    from megatron_dchag.training.builder import build_single_model
    from megatron_dchag.training.checkpoint_conversion import config_for_layout, saved_checkpoint_config
    from megatron_dchag.training.checkpointing import (
        load_checkpoint)

    ckpt, saved = saved_checkpoint_config(args.load)
    cfg = config_for_layout(saved, 1, 1, task="hyperspectral_mae")  # TP = PP = 1, the saved channel groups kept
    cfg.training.bf16 = False
    data_path = args.data_path or cfg.data.data_path
    stats_file = args.stats_file or cfg.data.stats_file
    initialize_distributed(1, 1, seed=cfg.training.seed)
    try:
        dataset = HyperspectralDataset(
            data_path, crop_size=tuple(cfg.model.image_size), num_channels_expected=cfg.model.num_channels,
            stats_file=stats_file, dataset_name=cfg.data.dataset_name, layout=cfg.data.layout,
            split=args.split, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed,
            val_files=cfg.data.val_files, test_files=cfg.data.test_files, nodata=cfg.data.nodata,
        )
        wl = dataset.all_wavelengths
        model = build_single_model(cfg, HyperspectralMAETask(cfg))  # the model of the saved config, as trained
        load_checkpoint(args.load, [model], load_rng=False)
        model.eval()
        item = dataset[(0, args.index % len(dataset))]
        images = item["image"].unsqueeze(0)
        grid = model.grid
        vis, msk = random_patch_mask(grid[0] * grid[1], cfg.mae.mask_ratio, 1, mask_generator(args.seed, 0, args.index))
        with torch.no_grad():
            out = model(images, vis, msk)
        p = cfg.model.patch_size
        c, h, w = images.shape[1:]
        pred = out.prediction[0]  # [C, Lm, p*p]
        if cfg.mae.norm_pix_loss:  # undo the per-patch normalization with the true patch statistics
            tgt_raw = images[0].reshape(c, grid[0], p, grid[1], p).permute(0, 1, 3, 2, 4).reshape(c, -1, p * p)
            tgt_raw = tgt_raw[:, msk[0]]
            pred = pred * (tgt_raw.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt() + tgt_raw.mean(-1, keepdim=True)
        patches = images[0].reshape(c, grid[0], p, grid[1], p).permute(0, 1, 3, 2, 4).reshape(c, -1, p * p).clone()
        masked_patches = patches.clone()
        masked_patches[:, msk[0]] = float("nan")
        recon = patches.clone()
        recon[:, msk[0]] = pred

        def unpatch(t):
            return t.reshape(c, grid[0], grid[1], p, p).permute(0, 1, 3, 2, 4).reshape(c, h, w).numpy()

        stats = load_channel_stats(stats_file, cfg.model.num_channels) if stats_file else None
        mean = stats.mean.reshape(-1, 1, 1) if stats is not None else 0.0
        std = stats.std.reshape(-1, 1, 1) if stats is not None else 1.0
        original, masked, reconstructed = (unpatch(t) * std + mean for t in (patches, masked_patches, recon))
        loss = float(out.loss)
        baseline = float(out.mean_baseline_loss)
    finally:
        destroy_distributed()
    return dict(original=original, masked=masked, reconstructed=reconstructed, wavelengths=wl, loss=loss,
                baseline=baseline, masked_index=msk[0].numpy(), grid=grid, patch=p)


def plot(result: dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wl = result["wavelengths"]
    original, masked, recon = result["original"], result["masked"], result["reconstructed"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.3), gridspec_kw={"width_ratios": [1, 1, 1, 1.4]})
    rgb_masked = _false_colour(np.nan_to_num(masked, nan=np.nanmin(masked)), wl)
    rgb_masked[np.isnan(masked[0])] = 0.5
    for ax, img, title in ((axes[0], _false_colour(original, wl), "original"),
                           (axes[1], rgb_masked, "masked input (grey = masked)"),
                           (axes[2], _false_colour(recon, wl), "reconstruction")):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    # One pixel at the centre of the first masked patch.
    gw, p = result["grid"][1], result["patch"]
    k = int(result["masked_index"][len(result["masked_index"]) // 2])
    y, x = (k // gw) * p + p // 2, (k % gw) * p + p // 2
    axes[0].plot([x], [y], "w+", ms=10, mew=2)
    xs = wl if wl is not None else np.arange(original.shape[0])
    axes[3].plot(xs, original[:, y, x], label="original", lw=2)
    axes[3].plot(xs, recon[:, y, x], label="reconstruction", lw=2, ls="--")
    axes[3].set_xlabel("wavelength (nm)" if wl is not None else "channel")
    axes[3].set_ylabel("value")
    axes[3].set_title(f"spectrum of masked pixel ({y}, {x})")
    axes[3].legend()
    fig.suptitle(f"MAE reconstruction: masked-patch MSE {result['loss']:.4f} "
                 f"(predicting the per-channel mean: {result['baseline']:.4f})")
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint (save directory or iter_* directory)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--stats-file", default=None)
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    args = parser.parse_args(argv)
    from megatron_dchag.training.entry_point import report_user_error, user_errors

    try:
        result = reconstruct(args)
    except (ValueError, KeyError, *user_errors()) as exc:
        return report_user_error(exc)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(result, args.out)
    print(f"wrote {args.out} (masked-patch MSE {result['loss']:.4f}, per-channel-mean baseline {result['baseline']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
