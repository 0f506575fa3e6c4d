"""Segmentation fine-tuning of a D-CHAG ViT on labelled hyperspectral cubes: the entry point's ``main``.

    python finetune_hyperspectral.py --config configs/hyperspectral/segmentation_tiny.yaml --data-path DIR \\
        --pretrained MAE_RUN [segmentation.mode=linear_probe] [overrides]
    dchag-finetune-hyperspectral --config ... --pretrained MAE_RUN
    torchrun --nproc-per-node 2 finetune_hyperspectral.py --config ... --tensor-model-parallel-size 2 ...

``--pretrained RUN`` (the same as ``segmentation.pretrained=RUN``) starts the encoder from an MAE
run's checkpoint (a ``--save`` directory or one ``iter_*`` directory): only the encoder's tensors
are read, through megatron-core dist_checkpointing, at this launch's TP x PP layout whatever the
layout it was saved at; a position embedding of another patch grid is interpolated. The
checkpoint's architecture must be the config's (every difference is listed in one error line).
Without it the encoder starts untrained. ``--load`` resumes a fine-tuning run (its checkpoint
holds every weight; ``--pretrained`` is then not read). Every other flag is the pretraining
entry point's (README.md); the task is :mod:`megatron_dchag.tasks.segmentation`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from megatron_dchag.config import ExperimentConfig, build_dataclass, config_to_dict, resolve_config
from megatron_dchag.training.entry_point import TaskRef, run_entry_point

PRETRAINED_FLAG = "--pretrained"
# The encoder's architecture: a checkpoint must agree on every one to be loaded.
ENCODER_FIELDS = ("num_channels", "channel_groups", "hidden_size", "num_layers", "num_attention_heads",
                  "patch_size", "strategy", "aggregation_layer", "aggregation_tree", "aggregation_heads",
                  "ffn_hidden_size", "channel_embedding", "lead_time_embedding")


def _encoder_only(encoder: Any) -> Any:
    """A model whose only part is ``encoder`` (the same module): its sharded state dict holds the
    ``encoder.*`` tensors alone, under the keys every model with an encoder saves them."""
    from megatron.core.transformer.module import MegatronModule

    class EncoderOnly(MegatronModule):
        def __init__(self, encoder: Any):
            super().__init__(config=encoder.config)
            self.encoder = encoder

    return EncoderOnly(encoder)


def encoder_differences(saved: dict, cfg: ExperimentConfig) -> List[str]:
    """``model.<field>: checkpoint A vs config B`` for each encoder field that differs (both resolved)."""
    ours = config_to_dict(resolve_config(cfg))["model"]
    theirs = config_to_dict(resolve_config(build_dataclass(ExperimentConfig, {k: saved.get(k) or {} for k in (
        "model", "parallel")})))["model"]
    return [f"model.{f}: checkpoint {theirs.get(f)!r} vs config {ours.get(f)!r}" for f in ENCODER_FIELDS
            if theirs.get(f) != ours.get(f)]


class PretrainedEncoderLoader:
    """Loads the encoder tensors of the checkpoint ``checkpoint`` into a model's ``encoder``
    (collective over all ranks; call it with each freshly built model chunk)."""

    def __init__(self, checkpoint: str, saved_grid: Tuple[int, int], current_grid: Tuple[int, int]):
        self.checkpoint, self.saved_grid, self.current_grid = checkpoint, saved_grid, current_grid

    def __call__(self, model: Any) -> None:
        import torch.distributed as dist

        from megatron_dchag.training.checkpointing import load_checkpoint

        load_checkpoint(self.checkpoint, [_encoder_only(model.encoder)], load_rng=False,
                        saved_grid=self.saved_grid, current_grid=self.current_grid)
        if not dist.is_initialized() or dist.get_rank() == 0:
            resized = "" if self.saved_grid == self.current_grid else (
                f"; position embedding interpolated from a {self.saved_grid[0]}x{self.saved_grid[1]} patch grid")
            print(f"loaded the pretrained encoder of {self.checkpoint}{resized}", flush=True)


def normalization_warning(pretrained_stats: Optional[str], stats_file: Optional[str]) -> Optional[str]:
    """One line when the pretraining run normalized its inputs differently from this run (the
    encoder would see inputs on another scale); None when they agree or cannot be compared."""
    import os

    import numpy as np

    from megatron_dchag.data.hyperspectral.statistics import load_channel_stats

    if not pretrained_stats or not stats_file or not os.path.isfile(pretrained_stats):
        if bool(pretrained_stats) != bool(stats_file):
            return (f"data.stats_file={stats_file!r}, but the pretrained encoder was trained with stats_file="
                    f"{pretrained_stats!r}: its inputs were normalized differently")
        return None
    theirs, ours = load_channel_stats(pretrained_stats), load_channel_stats(stats_file)
    same = (theirs.num_channels == ours.num_channels and np.allclose(theirs.mean, ours.mean, rtol=1e-6)
            and np.allclose(theirs.std, ours.std, rtol=1e-6))
    if same:
        return None
    return (f"data.stats_file '{stats_file}' differs from the statistics the pretrained encoder was trained with "
            f"('{pretrained_stats}'); fine-tune with those so the encoder sees inputs on the scale it learned")


def _build_finetune_task_class() -> type:
    from megatron_dchag.tasks.segmentation import HyperspectralSegmentationTask

    class FinetuneSegmentationTask(HyperspectralSegmentationTask):
        """The segmentation task with ``segmentation.pretrained`` checked before any compute and its
        encoder loaded into every model chunk."""

        def prepare(self) -> None:
            from megatron_dchag.training.checkpointing import CheckpointError, read_checkpoint_config, resolve_checkpoint_dir

            super().prepare()
            seg, tr, m = self.cfg.segmentation, self.cfg.training, self.cfg.model
            if not seg.pretrained or tr.load:
                return
            checkpoint = resolve_checkpoint_dir(seg.pretrained)  # CheckpointError naming the directory
            saved = read_checkpoint_config(checkpoint)
            if saved is None:
                raise CheckpointError(f"segmentation.pretrained: checkpoint '{checkpoint}' has no config.yaml, so its "
                                      "architecture cannot be checked")
            diffs = encoder_differences(saved, self.cfg)
            if diffs:
                raise CheckpointError(f"segmentation.pretrained: checkpoint '{checkpoint}' holds another encoder: "
                                      + "; ".join(diffs))
            sm = saved.get("model") or {}
            saved_grid = tuple(s // sm["patch_size"] for s in sm.get("image_size") or m.image_size)
            current_grid = tuple(s // m.patch_size for s in m.image_size)
            self.encoder_loader = PretrainedEncoderLoader(checkpoint, saved_grid, current_grid)
            warning = normalization_warning((saved.get("data") or {}).get("stats_file"), self.cfg.data.stats_file)
            if warning:
                self._warnings.append(warning)

    return FinetuneSegmentationTask


_LAZY_CLASSES = {"FinetuneSegmentationTask": _build_finetune_task_class}


def __getattr__(name: str) -> Any:
    """``FinetuneSegmentationTask`` is defined on first use (it subclasses the torch-based
    segmentation task), so ``--help`` and config errors answer before torch is imported."""
    if name in _LAZY_CLASSES:
        cls = _LAZY_CLASSES[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TASK = TaskRef(__name__, "FinetuneSegmentationTask", config_sections=("segmentation",))


def pretrained_as_override(argv: Sequence[str]) -> List[str]:
    """``--pretrained RUN`` / ``--pretrained=RUN`` -> the override ``segmentation.pretrained=RUN``
    (the other arguments unchanged)."""
    out: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == PRETRAINED_FLAG:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                from megatron_dchag.config import ConfigError

                raise ConfigError(f"command line: argument {PRETRAINED_FLAG}: expected one argument (an MAE run)")
            out.append(f"segmentation.pretrained={args[i + 1]}")
            i += 2
            continue
        if arg.startswith(PRETRAINED_FLAG + "="):
            out.append(f"segmentation.pretrained={arg.split('=', 1)[1]}")
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    from megatron_dchag.training.entry_point import report_user_error

    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        args = pretrained_as_override(raw)
    except ValueError as exc:  # ConfigError
        return report_user_error(exc)
    return run_entry_point(args, TASK,
                           "D-CHAG segmentation fine-tuning on labelled hyperspectral cubes "
                           f"({PRETRAINED_FLAG} RUN: start the encoder from an MAE run)")
