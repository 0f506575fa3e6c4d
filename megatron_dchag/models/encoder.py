"""The D-CHAG encoder: channel stage -> 2-D position (+ lead-time) embedding -> TransformerBlock -> norm.

Usable as a library: build it with :func:`build_encoder` (or the class) inside an initialized
megatron ``parallel_state`` and attach your own head. Output is megatron's sequence-first layout
``[L, B, D]`` (``L`` = number of (visible) patch positions).

Pipeline parallelism: the first stage (``pre_process``) owns the channel stage and embeddings;
later stages receive hidden states through ``set_input_tensor``; the last stage
(``post_process``) applies the final layer norm. The backbone layers are split over the stages
evenly, or as ``parallel.pipeline_layer_split`` says (megatron-core's
``pipeline_model_parallel_layout``); layers keep their global numbers, so checkpoints reshard
between pipeline layouts. Under the interleaved schedule a rank builds one encoder per virtual
stage (``vp_stage``).

Sequence parallelism (``parallel.sequence_parallel``): the channel stage runs as without it
(its TP layers see the whole sequence), the embedded sequence is then split over the TP ranks
(``[L/T, B, D]`` on each rank, also between pipeline stages), and the last stage gathers the
output back to ``[L, B, D]``, replicated on the TP ranks as without sequence parallelism.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dchag.config import ModelConfig, ParallelConfig, TrainingConfig, resolve_model
from megatron_dchag.layers.channel_plan import group_generator
from megatron_dchag.layers.channel_stage import ChannelAggregationStage, make_channel_plan
from megatron_dchag.layers.embeddings import lead_time_features, sincos_2d, xavier_uniform_
from megatron_dchag.models.vit_spec import get_vit_block_spec


def pipeline_layout(parallel: ParallelConfig, num_layers: int) -> Optional[List[List[str]]]:
    """megatron-core ``pipeline_model_parallel_layout`` for ``parallel.pipeline_layer_split``.

    The split gives the number of backbone layers of each pipeline stage (``PP`` entries), or of
    each virtual stage in layer order (``PP x VPP`` entries: virtual stage ``v`` of pipeline rank
    ``p`` is entry ``v * PP + p``). The first entry also holds the embedding (the channel stage),
    the last the loss (head). ``None`` (no split, or PP = 1): megatron's even split.
    """
    split = parallel.pipeline_layer_split
    if split is None or parallel.pipeline_model_parallel_size == 1:
        return None
    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size or 1
    if len(split) == pp and vpp > 1:
        # one count per stage: spread each stage's layers evenly over its virtual stages
        per_virtual = [[n // vpp + (1 if v < n % vpp else 0) for v in range(vpp)] for n in split]
        split = [per_virtual[p][v] for v in range(vpp) for p in range(pp)]
    if len(split) != pp * vpp or sum(split) != num_layers:
        raise ValueError(f"parallel.pipeline_layer_split={parallel.pipeline_layer_split} does not fit "
                         f"PP={pp} x VPP={vpp} stages and {num_layers} layers")
    last = len(split) - 1
    return [(["embedding"] if i == 0 else []) + ["decoder"] * n + (["loss"] if i == last else [])
            for i, n in enumerate(split)]


def make_transformer_config(
    model: ModelConfig,
    parallel: Optional[ParallelConfig] = None,
    training: Optional[TrainingConfig] = None,
    num_layers: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    ffn_hidden_size: Optional[int] = None,
    pipelined: bool = True,
) -> TransformerConfig:
    """megatron-core TransformerConfig for the backbone (overridable sizes for e.g. an MAE decoder).

    CPU initialization keeps initial weights independent of the TP size; fusions that need apex or
    Transformer Engine stay off so the local path works without them.

    ``pipelined=False`` gives a config for a block that lives whole on one pipeline stage (the
    MAE's decoder on the last stage): no pipeline split, no virtual stages, no sequence
    parallelism.
    """
    parallel = parallel or ParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    training = training or TrainingConfig()
    bf16 = bool(training.bf16)
    recompute = {}
    if training.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif training.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    hidden = hidden_size or model.hidden_size
    layers = num_layers or model.num_layers
    if pipelined:
        vpp = parallel.virtual_pipeline_model_parallel_size if parallel.pipeline_model_parallel_size > 1 else None
        pipeline = dict(
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            pipeline_model_parallel_layout=pipeline_layout(parallel, layers),
            # meaningless at TP = 1 (and refused there by megatron-core): ignored, as in Megatron-LM
            sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        )
        if vpp:
            # The interleaved schedule sends activations forward and gradients backward in one
            # call. Batched (the default), both go to the same peer when PP = 2 (previous stage =
            # next stage) and are matched in posting order, which swaps them on gloo; megatron's
            # overlapped p2p path uses separate communicators for the two directions.
            pipeline.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    else:
        pipeline = dict(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                        sequence_parallel=False)
    return TransformerConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=num_attention_heads or model.num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or (model.ffn_hidden_size if hidden_size is None else 4 * hidden),
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        **pipeline,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.layernorm_epsilon,
        init_method_std=model.init_method_std,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        memory_efficient_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        **recompute,
    )


class DCHAGEncoder(MegatronModule):
    """Encoder over images with many channels; see the module docstring."""

    def __init__(
        self,
        model: ModelConfig,
        config: TransformerConfig,
        seed: int = 1234,
        wavelengths: Optional[Sequence[float]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        recompute_channel_stage: bool = False,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.model_config = model
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        if vp_stage is None and config.virtual_pipeline_model_parallel_size is not None:
            vp_stage = parallel_state.get_virtual_pipeline_model_parallel_rank()
        self.vp_stage = vp_stage
        self.sequence_parallel = bool(config.sequence_parallel)
        self.recompute_channel_stage = recompute_channel_stage
        self.plan = make_channel_plan(model)
        h, w = model.image_size
        self.grid = (h // model.patch_size, w // model.patch_size)
        d = model.hidden_size
        if pre_process:
            # The channel stage's TP layers work on whole sequences, also under sequence parallelism.
            stage_config = dataclasses.replace(config, sequence_parallel=False) if self.sequence_parallel else config
            self.channel_stage = ChannelAggregationStage(model, stage_config, self.plan, seed, wavelengths)
            self.pos_embedding = nn.Parameter(sincos_2d(self.grid[0], self.grid[1], d))
            if model.lead_time_embedding:
                self.lead_time_proj = nn.Linear(d, d)
                with torch.no_grad():
                    xavier_uniform_(self.lead_time_proj.weight, d, d, group_generator(seed, "lead_time", 0))
                    self.lead_time_proj.bias.zero_()
        self.decoder = TransformerBlock(
            config=config,
            spec=get_vit_block_spec(config, model.transformer_impl, vp_stage),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )

    @property
    def input_channel_range(self):
        """Input channels this rank must be given: ``[start, stop)`` (on every pipeline stage)."""
        return self.plan.owned_channel_range(self.model_config.shards_channels)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(
        self,
        images: torch.Tensor,
        patch_index: Optional[torch.Tensor] = None,
        lead_time_hours: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Channel stage + position/lead-time embeddings: ``[L, B, D]``."""
        if self.recompute_channel_stage and self.training:
            # Non-reentrant recompute: the input images do not require grad, and megatron's
            # (reentrant) tensor_parallel.checkpoint then returns an output without a graph, so the
            # channel stage's parameters would silently get no gradient at all.
            hidden = torch.utils.checkpoint.checkpoint(self.channel_stage, images, patch_index, use_reentrant=False)
        else:
            hidden = self.channel_stage(images, patch_index)
        pos = self.pos_embedding.to(hidden.dtype)
        if patch_index is None:
            hidden = hidden + pos.unsqueeze(1)
        else:
            hidden = hidden + pos[patch_index.t()]  # [Lv, B, D]
        if self.model_config.lead_time_embedding:
            if lead_time_hours is None:
                raise ValueError("this encoder has a lead-time embedding: pass lead_time_hours [B]")
            lead = self.lead_time_proj(lead_time_features(lead_time_hours, hidden.shape[-1]).to(hidden.dtype))
            hidden = hidden + lead.unsqueeze(0)
        return hidden

    def forward(
        self,
        images: Optional[torch.Tensor],
        patch_index: Optional[torch.Tensor] = None,
        lead_time_hours: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[L, B, D]`` on the last pipeline stage; on other stages the hidden states sent to the
        next stage (``[L/T, B, D]`` under sequence parallelism)."""
        hidden = self.embed(images, patch_index, lead_time_hours) if self.pre_process else None
        if hidden is not None and self.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        out = self.decoder(hidden_states=hidden, attention_mask=None)
        if self.post_process and self.sequence_parallel:
            # Consumers are TP-replicated (their inputs enter TP regions through copy-to-TP, whose
            # backward all-reduces): each rank's gradient is already the full one, so the gather's
            # backward keeps this rank's slice instead of reduce-scattering.
            out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out


def build_encoder(model: ModelConfig, parallel: Optional[ParallelConfig] = None,
                  training: Optional[TrainingConfig] = None, seed: int = 1234, **kwargs) -> DCHAGEncoder:
    """Resolve ``model`` at the current TP size (G = TP when unset), validate it and build the encoder."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = resolve_model(model, tp)
    model.validate(tp)
    config = make_transformer_config(model, parallel, training)
    return DCHAGEncoder(model, config, seed=seed, recompute_channel_stage=(
        training is not None and training.recompute_granularity == "channel_stage"), **kwargs)
