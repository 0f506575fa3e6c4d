"""Per-pixel classification (segmentation) of hyperspectral cubes: the workload of ``finetune_hyperspectral.py``.

The model is :class:`~megatron_dchag.models.segmentation.SegmentationModel`: the D-CHAG encoder
over all patches and a per-patch linear head to ``p x p x K`` class logits, trained with
cross-entropy over the labelled pixels (``segmentation.ignore_index`` counts nowhere).

Data. Each cube file carries its labels as an ``H x W`` integer dataset
(``segmentation.label_dataset``, :mod:`~megatron_dchag.data.hyperspectral.labels`); a crop of the
cube comes with the same window of its labels. The cubes, their split (``data.val_files`` /
``data.val_fraction``: whole files, so the validation scenes are spatially disjoint from the
training ones), statistics, TP channel slices, sampler and loader are the MAE task's
(:class:`~megatron_dchag.tasks.mae_pretraining.HyperspectralMAETask`, whose data checks this task
shares). Before any model is built, :meth:`HyperspectralSegmentationTask.prepare` also checks
every used cube's label map (present, the cube's height and width, integer, values in
``0 .. num_classes - 1`` or the ignore index) and fills in ``segmentation.num_classes`` and
``segmentation.class_names`` from the label maps when they are unset.

Modes (``segmentation.mode``): ``finetune`` trains every weight, the encoder at
``segmentation.encoder_lr_multiplier`` x the learning rate (:meth:`learning_rate_multipliers`);
``linear_probe`` freezes the encoder (its parameters do not require gradients) and trains the head.
The encoder starts from a pretrained MAE run when an encoder loader is given
(:attr:`HyperspectralSegmentationTask.encoder_loader`, set by the entry point from
``segmentation.pretrained``), else from its seeded initialization.

Evaluation counts, on the validation crops (fixed crops; each crop once per evaluation even when
the stream cycles), a :class:`~megatron_dchag.segmentation_metrics.ConfusionMatrix` of the
labelled pixels; DP ranks sum their matrices (exact integer sums) and rank 0 computes overall
accuracy, mean class accuracy, Cohen's kappa and mean IoU from the sum. The eval record of
``metrics.jsonl`` gets ``overall_accuracy``, ``mean_class_accuracy``, ``kappa``, ``mean_iou``,
``labelled_pixels`` and per class ``accuracy/<name>`` and ``iou/<name>``; ``<log-dir>/segmentation_metrics.md``
a markdown table.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Set

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dchag.config import ConfigError, ExperimentConfig
from megatron_dchag.data.hyperspectral.dataset import HyperspectralDataset
from megatron_dchag.data.hyperspectral.labels import check_label_map, label_class_names
from megatron_dchag.data.loader import MicroBatchLoader
from megatron_dchag.data.sampler import DistributedResumableSampler
from megatron_dchag.device import batch_to_device
from megatron_dchag.models.segmentation import SegmentationModel
from megatron_dchag.segmentation_metrics import ConfusionMatrix
from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask, SamplerPlan

METRICS_FILE = "segmentation_metrics.md"
SCORE_KEYS = ("overall_accuracy", "mean_class_accuracy", "kappa", "mean_iou")


class LabelledCubeBatch:
    """``(epoch, index)`` keys -> the micro-batch ``{"images", "labels", "index"}`` (a pure function
    of the keys)."""

    def __init__(self, dataset: HyperspectralDataset):
        self.dataset = dataset

    def __call__(self, keys) -> Dict[str, torch.Tensor]:
        items = [self.dataset[(epoch, index)] for epoch, index in keys]
        return {
            "images": torch.stack([it["image"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items]),
            "index": torch.tensor([index for _, index in keys]),
        }


class LabelledCubeStream(MicroBatchLoader):
    """Micro-batches ``{"images", "labels", "index"}`` for one DP rank; the state is the sampler's."""

    def __init__(self, dataset: HyperspectralDataset, sampler: DistributedResumableSampler, micro_batch_size: int,
                 num_workers: int = 0):
        super().__init__(SamplerPlan(sampler, micro_batch_size), LabelledCubeBatch(dataset), num_workers=num_workers)


class HyperspectralSegmentationTask(HyperspectralMAETask):
    name = "hyperspectral_segmentation"
    config_sections = ("segmentation",)

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        # Called with each freshly built model chunk (before any wrapping) to load pretrained
        # encoder weights into it; collective over all ranks. None: the encoder starts untrained.
        self.encoder_loader: Optional[Callable[[SegmentationModel], None]] = None
        self._confusion: Optional[ConfusionMatrix] = None
        self._seen: Set[int] = set()  # validation crops counted in this evaluation
        self._crops_counted = 0

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        super().prepare()  # data path, split, cube contract, statistics, wavelengths
        seg = self.cfg.segmentation
        train, used = self._checked_train, self._checked_train + self._checked_val  # as the MAE checks passed them
        values_of = {path: check_label_map(path, seg.label_dataset, self._cube_shapes[path]) for path in used}
        names = label_class_names(used[0], seg.label_dataset) if used else None
        if seg.num_classes is None:
            if seg.class_names is not None:
                seg.num_classes = len(seg.class_names)
            elif names is not None:
                seg.num_classes = len(names)
            else:
                labels = [v for path in (train or used) for v in values_of[path] if v != seg.ignore_index]
                seg.num_classes = max(2, 1 + max(labels, default=0))
        k = seg.num_classes
        if 0 <= seg.ignore_index < k:
            raise ConfigError(f"segmentation.ignore_index={seg.ignore_index} is a class label (0 .. {k - 1}); "
                              "use a value outside them, e.g. -1 or 255")
        for path, values in values_of.items():
            bad = sorted(v for v in values if v != seg.ignore_index and not 0 <= v < k)
            if bad:
                raise ConfigError(
                    f"{path}: label dataset '{seg.label_dataset}' holds {bad[0]}, outside the classes 0 .. {k - 1} "
                    f"(segmentation.num_classes={k}) and not segmentation.ignore_index={seg.ignore_index}"
                )
        if seg.class_names is None:
            seg.class_names = list(names) if names is not None and len(names) == k else [f"class_{i}" for i in range(k)]
        elif len(seg.class_names) != k:
            raise ConfigError(f"segmentation.class_names has {len(seg.class_names)} names but "
                              f"segmentation.num_classes={k}")

    def build_model(self, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
        model = SegmentationModel(self.cfg, seed=self.cfg.training.seed, wavelengths=self.cfg.model.wavelengths,
                                  pre_process=pre_process, post_process=post_process)
        if self.encoder_loader is not None:
            self.encoder_loader(model)
        if self.cfg.segmentation.mode == "linear_probe":
            for p in model.encoder.parameters():
                p.requires_grad_(False)
        return model

    def learning_rate_multipliers(self) -> Dict[str, float]:
        seg = self.cfg.segmentation
        if seg.mode != "finetune" or seg.encoder_lr_multiplier == 1.0:
            return {}
        return {"*encoder.*": seg.encoder_lr_multiplier}

    def pipeline_tensor_shape(self):
        """The encoder's tokens of all patches ``(L, D)`` travel between pipeline stages."""
        return (self.cfg.model.num_patches, self.cfg.model.hidden_size)

    # -- data -----------------------------------------------------------------------------------
    def _stream(self, model, split: str, dp_rank: int, dp_size: int, shuffle: bool) -> LabelledCubeStream:
        dataset = HyperspectralDataset(
            self.cfg.data.data_path, channel_range=model.input_channel_range, split=split,
            label_dataset=self.cfg.segmentation.label_dataset, **self._dataset_kwargs(),
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
        return LabelledCubeStream(dataset, sampler, self.cfg.training.micro_batch_size,
                                  num_workers=self.cfg.data.num_workers)

    def train_stream(self, model, dp_rank, dp_size):
        return self._stream(model, "train", dp_rank, dp_size, shuffle=True)

    def eval_stream(self, model, dp_rank, dp_size):
        """Unshuffled, so each DP rank sees the same crops at every pass: counting each crop once
        per rank counts it once over all ranks."""
        self._confusion = ConfusionMatrix(self.cfg.segmentation.num_classes, self.cfg.segmentation.ignore_index)
        self._seen, self._crops_counted = set(), 0
        return self._stream(model, "val", dp_rank, dp_size, shuffle=False)

    # -- step -----------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        raw = next(data_iterator)  # on the CPU: the metrics read it there
        batch = batch_to_device(raw)
        training = model.training
        if training:
            self._note_step_inputs(raw["index"], batch["images"])
        out = model(batch["images"], batch["labels"])
        if isinstance(out, torch.Tensor):  # not the last pipeline stage: hidden states for the next one
            return out, None
        loss, logits = out[0], out[1]
        if not training:
            self._count(logits.detach(), raw)

        def loss_func(output_tensor):
            return output_tensor, {"loss": output_tensor.detach().clone()}

        return loss, loss_func

    def _count(self, logits: torch.Tensor, raw: Dict[str, Any]) -> None:
        if self._confusion is None:
            return
        rows = [row for row, index in enumerate(raw["index"].tolist()) if index not in self._seen]
        self._seen.update(raw["index"][rows].tolist())
        if rows:
            keep = torch.tensor(rows, dtype=torch.long)
            predicted = logits.index_select(0, keep.to(logits.device)).argmax(1).cpu()
            self._confusion.update(predicted, raw["labels"].index_select(0, keep))
            self._crops_counted += len(rows)

    def flops_per_sample(self) -> float:
        """Encoder + head forward; backward through both (finetune) or the head only (linear_probe)."""
        from megatron_dchag.flops import encoder_flops, training_flops

        m, k = self.cfg.model, self.cfg.segmentation.num_classes or 2
        encoder = encoder_flops(m, 1, None, self.cfg.parallel.tensor_model_parallel_size)
        head = 2.0 * m.num_patches * m.hidden_size * k * m.patch_size**2
        if self.cfg.segmentation.mode == "linear_probe":
            return encoder + training_flops(head)
        return training_flops(encoder + head)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_extra(self, model, step: int) -> Dict[str, Any]:
        seg = self.cfg.segmentation
        box: List[Any] = [None]
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and self._confusion is not None:
            self._confusion.all_reduce(parallel_state.get_data_parallel_group())
            crops = torch.tensor([self._crops_counted], dtype=torch.int64)
            if parallel_state.get_data_parallel_world_size() > 1:
                dist.all_reduce(crops, group=parallel_state.get_data_parallel_group())
            box = [(self._confusion.counts.clone(), int(crops.item()))]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            src = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())[-1]
            dist.broadcast_object_list(box, src=src, group=parallel_state.get_pipeline_model_parallel_group())
        if box[0] is None:
            return {}
        confusion = ConfusionMatrix(seg.num_classes, seg.ignore_index)
        confusion.counts, crops = box[0]
        result: Dict[str, Any] = dict(confusion.scores())
        result["labelled_pixels"] = confusion.total
        names = seg.class_names or [f"class_{i}" for i in range(seg.num_classes)]
        for name, acc, iou in zip(names, confusion.class_accuracy(), confusion.iou()):
            result[f"accuracy/{name}"] = acc
            result[f"iou/{name}"] = iou
        log_dir = self.cfg.training.log_dir or self.cfg.training.save
        if dist.get_rank() == 0 and log_dir:
            start = "a pretrained encoder (" + seg.pretrained + ")" if seg.pretrained else "an untrained encoder"
            table = confusion.markdown_table(
                names, f"Segmentation metrics at step {step}",
                f"Validation split of `{self.cfg.data.data_path}`: {crops} crops of "
                f"{self.cfg.model.image_size[0]} x {self.cfg.model.image_size[1]} pixels, each counted once; "
                f"labelled pixels only (label {seg.ignore_index} ignored). Mode {seg.mode}, from {start}.",
            )
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, METRICS_FILE)
            with open(path + ".tmp", "w") as fh:
                fh.write(table)
            os.replace(path + ".tmp", path)
        return result
