"""Masked-autoencoder pretraining on hyperspectral cubes (the workload of ``pretrain_hyperspectral.py``).

Each rank reads only the channels its model part needs (``model.input_channel_range``: its own
channel groups under ``dchag``/``dist_tokenize``, all channels under the unsharded baselines).
Micro-batches are drawn by a resumable, seeded sampler over data-parallel ranks; the random patch
mask of a sample is a pure function of ``(seed, epoch, sample index)``, so every TP rank of a DP
rank masks the same patches and a resumed run repeats the same masks. ``data.num_workers``
background processes read the crops and build the micro-batches (:mod:`~megatron_dchag.data.loader`).

Before any model is built, :meth:`HyperspectralMAETask.prepare` checks the data against the run:
the split (``data.val_fraction`` / ``data.val_files`` / ``data.test_files``) leaves cubes to train
and, when the run evaluates, to validate on; under ``data.nodata=error`` no cube the statistics
file records as holding missing values is used; and it notes (:meth:`~HyperspectralMAETask.data_warnings`)
statistics that were computed over validation or test cubes. Under ``data.nodata=mask`` each
micro-batch carries a validity mask to the loss. Every training micro-batch's cubes and their
largest input values are noted, so that a non-finite step names them
(:meth:`~HyperspectralMAETask.take_step_inputs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from megatron.core import parallel_state

from megatron_dchag.config import ConfigError, ExperimentConfig, RunShape, run_shape
from megatron_dchag.data.hyperspectral.dataset import HyperspectralDataset
from megatron_dchag.data.hyperspectral.discovery import scan_cubes
from megatron_dchag.data.hyperspectral.nodata import check_recorded_missing
from megatron_dchag.data.hyperspectral.splits import SplitOptions, split_collection
from megatron_dchag.data.hyperspectral.statistics import coverage_warning, load_channel_stats
from megatron_dchag.data.loader import MicroBatchLoader, MicroBatchPlan
from megatron_dchag.data.sampler import DistributedResumableSampler
from megatron_dchag.device import batch_to_device
from megatron_dchag.models.mae import MaskedAutoencoder, random_patch_mask
from megatron_dchag.tasks.base import Task


def mask_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    key = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x4D41534B]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(key))


class SamplerPlan(MicroBatchPlan):
    """Which samples each micro-batch holds: the next ``micro_batch_size`` ``(epoch, index)`` keys
    of the sampler; the state is the sampler's ``(epoch, position)``."""

    def __init__(self, sampler: DistributedResumableSampler, micro_batch_size: int):
        self.sampler, self.micro_batch_size = sampler, micro_batch_size
        self._indices: Optional[Iterator] = None

    def next_description(self) -> List[Tuple[int, int]]:
        if self._indices is None:
            self._indices = iter(self.sampler)
        return [next(self._indices) for _ in range(self.micro_batch_size)]

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._indices = None


class MaskedCubeBatch:
    """``(epoch, index)`` keys -> the micro-batch ``{"images", "visible", "masked", "index"}``, plus
    ``"valid"`` under ``data.nodata=mask`` (a pure function of the keys: crops and masks are seeded
    by ``(seed, epoch, index)``)."""

    def __init__(self, dataset: HyperspectralDataset, num_patches: int, mask_ratio: float, seed: int):
        self.dataset = dataset
        self.num_patches, self.mask_ratio, self.seed = num_patches, mask_ratio, seed

    def __call__(self, keys: List[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        images, visible, masked, indices, valid = [], [], [], [], []
        for epoch, index in keys:
            item = self.dataset[(epoch, index)]
            vis, msk = random_patch_mask(self.num_patches, self.mask_ratio, 1, mask_generator(self.seed, epoch, index))
            images.append(item["image"])
            visible.append(vis[0])
            masked.append(msk[0])
            indices.append(index)
            if "valid" in item:
                valid.append(item["valid"])
        batch = {
            "images": torch.stack(images),
            "visible": torch.stack(visible),
            "masked": torch.stack(masked),
            "index": torch.tensor(indices),
        }
        if valid:
            batch["valid"] = torch.stack(valid)
        return batch


class MaskedCubeStream(MicroBatchLoader):
    """Micro-batches ``{"images", "visible", "masked", "index"}`` for one DP rank, read inline or by
    ``num_workers`` background processes; the state is the sampler's."""

    def __init__(self, dataset: HyperspectralDataset, sampler: DistributedResumableSampler, micro_batch_size: int,
                 num_patches: int, mask_ratio: float, seed: int, num_workers: int = 0):
        super().__init__(SamplerPlan(sampler, micro_batch_size), MaskedCubeBatch(dataset, num_patches, mask_ratio, seed),
                         num_workers=num_workers)


class HyperspectralMAETask(Task):
    name = "hyperspectral_mae"
    config_sections = ("mae",)

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.wavelengths: Optional[np.ndarray] = None
        self._warnings: List[str] = []
        self._train_files: List[str] = []  # the train stream's cubes, by dataset index
        # what prepare() checked: the cubes this run trains and evaluates on, and each cube's (H, W)
        self._checked_train: List[Path] = []
        self._checked_val: List[Path] = []
        self._cube_shapes: Dict[Path, Tuple[int, int]] = {}
        self._input_channel_start = 0
        self._step_inputs: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _split_options(self) -> SplitOptions:
        d = self.cfg.data
        return SplitOptions(val_fraction=d.val_fraction, val_files=d.val_files, test_files=d.test_files)

    def _dataset_kwargs(self) -> Dict[str, Any]:
        d = self.cfg.data
        return dict(
            crop_size=tuple(self.cfg.model.image_size), num_channels_expected=self.cfg.model.num_channels,
            stats_file=d.stats_file, dataset_name=d.dataset_name, layout=d.layout, file_format=d.file_format,
            val_fraction=d.val_fraction, val_files=d.val_files, test_files=d.test_files, nodata=d.nodata,
            seed=self.cfg.training.seed,
        )

    def prepare(self) -> None:
        d, m, tr = self.cfg.data, self.cfg.model, self.cfg.training
        if not d.data_path:
            raise ConfigError("data.data_path is not set (give --data-path DIR or data.data_path=DIR)")
        if not os.path.exists(d.data_path):
            raise ConfigError(f"data.data_path '{d.data_path}' does not exist")
        split = split_collection(d.data_path, d.file_format, self._split_options())
        train = [] if tr.skip_train else split.require("train")
        val = split.require("val", fix="or train without evaluation with --eval-iters 0") if tr.eval_iters > 0 else []
        used = train + val
        collection = scan_cubes(split.all, dataset_name=d.dataset_name, layout=d.layout, file_format=d.file_format,
                                num_channels_expected=m.num_channels, min_spatial_shape=tuple(m.image_size))
        if d.stats_file:
            stats = load_channel_stats(d.stats_file, num_channels_expected=collection.num_channels)
            if d.nodata == "error":
                check_recorded_missing(stats, used, d.stats_file)
            warning = coverage_warning(stats, split, d.stats_file, "recompute it on the run's training split with "
                                       "dchag-compute-stats --config <this run's config> (its default split)")
            if warning:
                self._warnings.append(warning)
        self._checked_train, self._checked_val = list(train), list(val)
        self._cube_shapes = dict(zip(split.all, collection.spatial_shapes))  # one reader per file, in order
        self.wavelengths = collection.wavelengths
        if m.wavelengths is None and self.wavelengths is not None:
            # Recorded in the resolved config (and so in every checkpoint): the model can be rebuilt
            # from a checkpoint alone, e.g. by tools/convert_checkpoint.py.
            m.wavelengths = [float(x) for x in self.wavelengths]
        if m.channel_embedding == "wavelength" and self.wavelengths is None and m.wavelengths is None:
            raise ConfigError(
                "model.channel_embedding='wavelength' but the cubes in data.data_path have no wavelengths "
                "(give model.wavelengths or use model.channel_embedding=index)"
            )

    def build_model(self, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
        return MaskedAutoencoder(self.cfg, seed=self.cfg.training.seed, wavelengths=self.cfg.model.wavelengths,
                                 pre_process=pre_process, post_process=post_process)

    def _shape(self) -> RunShape:
        return run_shape(self.cfg, parallel_state.get_data_parallel_world_size())

    def pipeline_tensor_shape(self):
        """The encoder's visible tokens ``(L_visible, D)`` travel between pipeline stages."""
        return (self._shape().visible_patches, self.cfg.model.hidden_size)

    def data_warnings(self) -> List[str]:
        return list(self._warnings)

    def _stream(self, model: MaskedAutoencoder, split: str, dp_rank: int, dp_size: int, shuffle: bool) -> MaskedCubeStream:
        dataset = HyperspectralDataset(
            self.cfg.data.data_path, channel_range=model.input_channel_range, split=split, **self._dataset_kwargs()
        )
        if split == "train":
            self._train_files = [str(p) for p in dataset.files]
            self._input_channel_start = model.input_channel_range[0]
        if len(dataset) < dp_size:
            raise ConfigError(
                f"the {split} split of data.data_path has {len(dataset)} cubes, fewer than the data-parallel size {dp_size}"
            )
        sampler = DistributedResumableSampler(
            len(dataset), num_replicas=dp_size, rank=dp_rank, seed=self.cfg.training.seed, shuffle=shuffle,
            drop_last=True, infinite=True, yield_epoch=True,
        )
        seed = self.cfg.training.seed if split == "train" else self.cfg.training.seed + 7919
        return MaskedCubeStream(dataset, sampler, self.cfg.training.micro_batch_size, model.encoder.grid[0] *
                                model.encoder.grid[1], self.cfg.mae.mask_ratio, seed,
                                num_workers=self.cfg.data.num_workers)

    def train_stream(self, model, dp_rank, dp_size):
        return self._stream(model, "train", dp_rank, dp_size, shuffle=True)

    def eval_stream(self, model, dp_rank, dp_size):
        return self._stream(model, "val", dp_rank, dp_size, shuffle=False)

    def forward_step(self, data_iterator, model):
        raw = next(data_iterator)
        batch = batch_to_device(raw)
        if model.training:
            self._note_step_inputs(raw["index"], batch["images"])
        out = model(batch["images"], batch["visible"], batch["masked"], batch.get("valid"))
        if isinstance(out, torch.Tensor):  # not the last pipeline stage: hidden states for the next one
            return out, None
        loss, baseline = out[0], out[3]
        reported = {"loss": loss.detach().clone(), "mean_baseline_loss": baseline.detach().clone()}

        def loss_func(output_tensor):
            return output_tensor, reported

        return loss, loss_func

    def _note_step_inputs(self, index: torch.Tensor, images: torch.Tensor) -> None:
        """Keep, per sample, its largest |input| and that channel (on the device: no sync here)."""
        flat = images.detach().reshape(images.shape[0], images.shape[1], -1)
        peak = torch.maximum(flat.amax(-1), -flat.amin(-1))  # [B, c]; NaN where the input has one
        peak = torch.nan_to_num(peak, nan=float("inf"))
        value, channel = peak.max(dim=1)
        self._step_inputs.append((index.clone(), value, channel))

    def take_step_inputs(self) -> List[Tuple[float, str, str]]:
        """The cubes of the training micro-batches forwarded since the last call, each with its
        largest |input| (normalized) and the channel holding it."""
        noted, self._step_inputs = self._step_inputs, []
        found = []
        for index, value, channel in noted:
            for i, v, c in zip(index.tolist(), value.tolist(), channel.tolist()):
                name = self._train_files[i] if 0 <= i < len(self._train_files) else f"sample {i}"
                found.append((v, name, f"{name} channel {self._input_channel_start + c} (largest |input| {v:.3g})"))
        return found

    def flops_per_sample(self) -> float:
        """Encoder on the visible patches + decoder on all patches + head on the masked ones, x3."""
        from megatron_dchag.flops import encoder_flops, training_flops, transformer_flops

        m, mae, shape = self.cfg.model, self.cfg.mae, self._shape()
        num_patches, visible, num_masked = shape.num_patches, shape.visible_patches, shape.masked_patches
        dd = mae.decoder_hidden_size
        forward = (
            encoder_flops(m, 1, visible, self.cfg.parallel.tensor_model_parallel_size)
            + 2.0 * visible * m.hidden_size * dd
            + transformer_flops(mae.decoder_num_layers, dd, 4 * dd, num_patches, 1)
            + 2.0 * num_masked * dd * m.num_channels * m.patch_size**2
        )
        return training_flops(forward)
