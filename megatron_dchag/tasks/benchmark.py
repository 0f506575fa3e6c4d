"""The benchmark's workload (``tools/benchmark.py``): the D-CHAG encoder on synthetic inputs.

:class:`SyntheticEncoderTask` gives the shared builder
(:func:`~megatron_dchag.training.builder.build_training_components`) the model the benchmark
measures, so the benchmark trains with the trainer's DDP, optimizer and bf16 wrapping rather than
its own copies of them. The model, :class:`EncoderLossModel`, is the encoder (optionally with a
channel-parallel head) and a scalar loss; each rank's micro-batch holds only its own input channels
(``input_channel_range``), as the real data streams deliver them. The task has no data streams and
writes no checkpoints, so it is not in the task registry.
"""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_dchag.config import ExperimentConfig
from megatron_dchag.layers.aggregation import FinalChannelCrossAttention
from megatron_dchag.layers.heads import ChannelParallelHead, reduce_loss_across_tp
from megatron_dchag.layers.tokenizer import patchify_channels_first
from megatron_dchag.models.encoder import DCHAGEncoder, make_transformer_config
from megatron_dchag.tasks.base import Task

FINAL_AGGREGATIONS = ("folded", "textbook")


class EncoderLossModel(MegatronModule):
    """The D-CHAG encoder with a scalar loss.

    Without a head the loss is the mean square of the encoder output ``[L, B, D]``. With
    ``with_head`` a :class:`~megatron_dchag.layers.heads.ChannelParallelHead` predicts the patches of
    this rank's channels and the loss is their MSE, reduced over TP. ``final_aggregation="textbook"``
    switches the final cross-attention to its explicit keys/values form (``folded = False``).
    """

    def __init__(self, cfg: ExperimentConfig, with_head: bool = False, final_aggregation: str = "folded"):
        if final_aggregation not in FINAL_AGGREGATIONS:
            raise ValueError(f"final_aggregation={final_aggregation!r} must be one of {FINAL_AGGREGATIONS}")
        model, training = cfg.model, cfg.training
        model.validate(cfg.parallel.tensor_model_parallel_size)
        config = make_transformer_config(model, cfg.parallel, training)
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        seed = training.seed
        self.encoder = DCHAGEncoder(model, config, seed=seed,
                                    recompute_channel_stage=training.recompute_granularity == "channel_stage")
        if final_aggregation == "textbook":
            for module in self.encoder.modules():
                if isinstance(module, FinalChannelCrossAttention):
                    module.folded = False
        self.patch_size = model.patch_size
        self.num_channels = model.num_channels
        self.head = (ChannelParallelHead(self.encoder.plan, model.hidden_size, model.patch_size**2, seed=seed)
                     if with_head else None)

    @property
    def input_channel_range(self):
        """Input channels this rank must be given: ``[start, stop)``."""
        return self.encoder.input_channel_range

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C_in, H, W]`` (this rank's input channels) -> the scalar loss."""
        out = self.encoder(images)  # [L, B, D]
        if self.head is None:
            return out.float().square().mean()
        pred = self.head(out)  # [L, B, C_head, p*p]
        lo = self.input_channel_range[0]
        head_lo, head_hi = self.head.channel_range
        target = patchify_channels_first(images[:, head_lo - lo:head_hi - lo], self.patch_size).permute(1, 2, 0, 3)
        local = (pred.float() - target.float()).square().sum()
        total = self.num_channels * target.shape[0] * target.shape[1] * target.shape[3]
        return reduce_loss_across_tp(local) / total


class SyntheticEncoderTask(Task):
    """:class:`EncoderLossModel` for the builder; ``forward_step`` takes the micro-batch (the images
    tensor itself) from the data iterator. Pipeline parallelism is not supported."""

    name = "synthetic_encoder"
    config_sections = ()

    def __init__(self, cfg: ExperimentConfig, with_head: bool = False, final_aggregation: str = "folded"):
        super().__init__(cfg)
        self.with_head, self.final_aggregation = with_head, final_aggregation

    def build_model(self, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
        if not (pre_process and post_process):
            raise ValueError("SyntheticEncoderTask builds whole models only (pipeline_model_parallel_size=1)")
        return EncoderLossModel(self.cfg, with_head=self.with_head, final_aggregation=self.final_aggregation)

    def forward_step(self, data_iterator, model):
        loss = model(next(data_iterator))
        reported = {"loss": loss.detach()}

        def loss_func(output_tensor):
            return output_tensor, reported

        return loss, loss_func

    def flops_per_sample(self) -> float:
        from megatron_dchag.flops import flops_breakdown, training_flops

        parts = flops_breakdown(self.cfg.model, 1, tensor_model_parallel_size=self.cfg.parallel.tensor_model_parallel_size,
                                with_head=self.with_head)
        return training_flops(parts["total"])
