"""Analytic per-rank memory model of D-CHAG training.

Counts what one tensor-parallel rank holds at its peak: parameters, gradients, optimizer state,
inputs and activations (tokenizer, channel aggregation, backbone, head), for any configuration
(model size, image, patch, channels, strategy, aggregation layer and tree, TP, DP with or without
the distributed optimizer, fp32 or bf16, activation recompute, micro-batch).

The activation terms are **this code's** allocations (:mod:`megatron_dchag.layers`,
megatron-core's transformer layer with the SDPA core attention), derived from what each op keeps
for backward and checked against ``torch.distributed._tools.mem_tracker.MemTracker`` on CPU
(``tools/estimate_memory.py --check-against bench.json``). Notation: ``B`` micro-batch, ``P = B x
visible patches`` token positions, ``D`` hidden, ``k = p^2``, ``e`` bytes per activation element,
``T`` TP size, ``C_in`` the input channels a rank holds (``C/T`` when channels are sharded,
``C`` otherwise).

Channel stage (held from its forward until its backward)::

    input images     B C_in H W e          (the data loader's batch on the device; fp32 for the
                                            framework megatron, whose Float16Module casts it, the
                                            fused stage keeping that bf16 copy)
    patches          C_in P k e            (copy kept for the tokenizer's weight gradient)
    tokens           C_in P D e            (kept by their consumer: partial aggregation or, for
                                            tp_baseline, the final cross-attention)
    dist_tokenize    + C P D e             (the all-gathered tokens, kept by the final layer)
    cross-attention levels: n P h e weights per level, small level outputs
    backward         + C_in P D e          (gradient of the tokens; dist_tokenize: + C P D e)

Fused channel stage (linear tree, ``channel_stage_impl`` fused or auto; see
:mod:`megatron_dchag.layers.fused_channel_stage`): no patches copy, no tokens, no token gradient.
It keeps only the images and the weights (both counted already) and makes the group tokens
``G_own P D e``; its backward works block by block (``K`` = channels of a block x ``k``, about
``FUSED_BLOCK_CONTRACTION``)::

    backward         P K e + K D 4 + 2 G_own P D e     (a block's patches and its fp32 product
                                                        buffer; the group tokens' gradient and
                                                        its transposed copy)

and the gradients of the channel-stage parameters exist during it (the tokenizer's is written
block by block into its final buffer).

Backbone per layer (megatron-core layer, SDPA attention, no dropout, no sequence parallelism):
``P D (4 + 12/T) e`` bytes; with full recompute only the layer input ``P D e`` per layer plus the
working set of one layer during its backward. Selective recompute does not change this number
with SDPA (no attention matrix is stored).

The peak is the largest of three moments: the end of the forward (all activations), the channel
stage's backward (its activations plus the token gradient, backbone activations freed), and the
optimizer step (all gradients).

Precision and optimizer (``framework``):

* ``torch`` (what ``tools/benchmark.py`` ran before its records carried ``framework``):
  ``torch.optim.AdamW``; gradients appear during
  backward (``set_to_none``); ``bf16`` keeps bf16 parameters and gradients plus an fp32 master copy,
  and converts every gradient to fp32 during the step. The (foreach) step itself allocates an
  fp32 ``sqrt(v)`` of every parameter and one more temporary of the largest one (measured with
  MemTracker); with the channel stage fused this step is often the peak.
* ``megatron`` (the trainer, ``tools/benchmark.py``; paper scale): megatron DDP keeps a persistent
  gradient buffer, fp32 ("main grads", Megatron-LM's default for bf16); bf16 adds fp32 master
  weights; the distributed optimizer divides master weights and Adam moments by the data-parallel
  size. A parameter's own ``.grad`` exists from the moment autograd makes it until DDP's hook adds
  it into the buffer; that matters for the fused channel stage, whose backward makes the
  tokenizer's weight gradient while its block buffers are alive. The step allocates nothing with
  apex / Transformer Engine's FusedAdam (``adam_impl="fused"``, paper scale). Without them
  megatron-core falls back to ``torch.optim.AdamW``, which steps here one parameter at a time
  (``adam_impl="torch"``, the CPU benchmark): ``sqrt(v)`` and its scaled copy, two fp32
  temporaries of the largest parameter.

Model sharding (``fsdp``, framework ``megatron``: megatron-core's ``TorchFullyShardedDataParallel``,
torch FSDP2, over the ``F = data_parallel_size`` ranks; ``parallel.use_torch_fsdp2``). The FSDP
units are the channel stage, each backbone layer and the head; the rest (position table, final
norm) is the root unit. ``w`` bytes per weight (2 bf16, 4 fp32)::

    parameters       N w / F             (each rank's shard of every unit)
    optimizer        N (8 [+ 4 master]) / F
    gradients        N w / F             (sharded .grad, made unit by unit in the backward; no
                                          persistent buffer, none before the backward)
    unit buffers     root w + 2 max_unit w      (reshard after forward: the root unit stays
                                          gathered; a unit's gathered weights and its unsharded
                                          gradient before the reduce-scatter)
                     N w                 (no reshard after forward: every unit gathered from its
                                          forward to its backward)
    step             N 4 / F             (fp32 main gradients; torch AdamW: + 2 fp32
                                          temporaries of the largest shard)

The channel-backward moment holds the channel stage's gathered weights and its unsharded gradient,
``2 channel_params w``, next to the other units' gradient shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_dchag.config import AGGREGATION_LAYERS, STRATEGIES, aggregation_level_sizes, resolve_model, split_evenly

__all__ = ["MemoryConfig", "MemoryEstimate", "estimate_memory", "param_counts", "fsdp_unit_params", "PAPER_MODELS",
           "paper_config", "GIB", "GB", "FUSED_BLOCK_CONTRACTION"]

GIB = 2**30
GB = 10**9
# Contraction length of one block product of the fused channel stage (the layer's BLOCK_CONTRACTION;
# a test keeps the two equal, this module stays free of torch).
FUSED_BLOCK_CONTRACTION = 2048


@dataclass
class MemoryConfig:
    """One configuration to estimate. The model fields are named as in ``ModelConfig`` and their
    unset defaults (G, FFN width, aggregation heads) resolve the same way."""

    # model
    hidden_size: int = 256
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    image_size: Tuple[int, int] = (64, 128)
    patch_size: int = 8
    num_channels: int = 1024
    strategy: str = "dchag"
    aggregation_layer: str = "linear"
    aggregation_tree: List[int] = field(default_factory=list)
    channel_groups: Optional[int] = None  # default: TP size
    aggregation_heads: Optional[int] = None  # default: num_attention_heads
    with_head: bool = False
    visible_patches: Optional[int] = None  # MAE: patch positions tokenized (default all)
    final_aggregation: str = "folded"  # or "textbook" (explicit keys/values of every token)
    channel_stage_impl: str = "auto"  # or "fused" / "reference", as in ModelConfig
    # parallelism
    tensor_model_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_optimizer: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the DP ranks (torch FSDP2)
    fsdp_reshard_after_forward: bool = True
    # training
    micro_batch_size: int = 2
    precision: str = "fp32"  # or "bf16"
    framework: str = "torch"  # or "megatron"
    adam_impl: str = "fused"  # framework megatron: "fused" (apex / TE FusedAdam) or "torch" (torch AdamW)
    recompute: Optional[str] = None  # backbone: None, "selective" or "full"
    recompute_channel_stage: bool = False

    # -- derived (the defaults resolved as for a ModelConfig, by megatron_dchag.config.resolve_model) --
    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def groups(self) -> int:
        return resolve_model(self, self.tp).channel_groups

    @property
    def ffn(self) -> int:
        return resolve_model(self, self.tp).ffn_hidden_size

    @property
    def agg_heads(self) -> int:
        return resolve_model(self, self.tp).aggregation_heads

    @property
    def num_patches(self) -> int:
        h, w = self.image_size
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def seq(self) -> int:
        return self.num_patches if self.visible_patches is None else self.visible_patches

    @property
    def sharded(self) -> bool:
        return self.strategy in ("dchag", "dist_tokenize")

    @property
    def partial(self) -> bool:
        return self.strategy in ("dchag", "hierarchical")

    @property
    def fused(self) -> bool:
        """Whether the channel stage runs fused (a linear tree; ``channel_stage_impl`` resolved)."""
        fusable = self.partial and self.aggregation_layer == "linear"
        return self.channel_stage_impl == "fused" or (self.channel_stage_impl == "auto" and fusable)

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.aggregation_layer not in AGGREGATION_LAYERS:
            raise ValueError(f"aggregation_layer={self.aggregation_layer!r} must be linear or cross_attention")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} must be fp32 or bf16")
        if self.framework not in ("torch", "megatron"):
            raise ValueError(f"framework={self.framework!r} must be torch or megatron")
        if self.adam_impl not in ("fused", "torch"):
            raise ValueError(f"adam_impl={self.adam_impl!r} must be fused or torch")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"recompute={self.recompute!r} must be None, selective or full")
        if self.final_aggregation not in ("folded", "textbook"):
            raise ValueError(f"final_aggregation={self.final_aggregation!r} must be folded or textbook")
        if self.channel_stage_impl not in ("auto", "fused", "reference"):
            raise ValueError(f"channel_stage_impl={self.channel_stage_impl!r} must be auto, fused or reference")
        if self.channel_stage_impl == "fused" and not (self.partial and self.aggregation_layer == "linear"):
            raise ValueError("channel_stage_impl=fused needs a linear partial-aggregation tree (strategy dchag or "
                             "hierarchical, aggregation_layer linear)")
        for name in ("tensor_model_parallel_size", "data_parallel_size", "micro_batch_size", "num_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.groups % self.tp:
            raise ValueError(f"channel_groups={self.groups} is not divisible by tensor_model_parallel_size={self.tp}")
        if self.num_channels < self.groups:
            raise ValueError(f"num_channels={self.num_channels} < channel_groups={self.groups}")
        if self.num_attention_heads % self.tp or self.agg_heads % self.tp:
            raise ValueError("attention heads must be divisible by the TP size")
        if self.fsdp and (self.framework != "megatron" or self.distributed_optimizer):
            raise ValueError("fsdp needs framework=megatron and no distributed_optimizer (FSDP shards the "
                             "optimizer state itself)")


def _owned_group_sizes(cfg: MemoryConfig) -> List[int]:
    """Group sizes held by the rank with the most channels."""
    sizes = split_evenly(cfg.num_channels, cfg.groups)
    if not cfg.sharded:
        return sizes
    per = cfg.groups // cfg.tp
    ranks = [sizes[r * per:(r + 1) * per] for r in range(cfg.tp)]
    return max(ranks, key=sum)


def _levels(cfg: MemoryConfig) -> List[Tuple[int, int]]:
    """(tokens in, chunks out) of each partial-aggregation level on the largest rank."""
    owned = _owned_group_sizes(cfg) if cfg.strategy == "dchag" else split_evenly(cfg.num_channels, cfg.groups)
    per_group = [aggregation_level_sizes(s, cfg.aggregation_tree) for s in owned]
    out = []
    for k in range(len(cfg.aggregation_tree) + 1):
        n = sum(sum(levels[k]) for levels in per_group)
        m = sum(len(levels[k]) for levels in per_group)
        out.append((n, m))
    return out


def param_counts(cfg: MemoryConfig) -> Dict[str, int]:
    """Parameters held by one rank (the one with the most channels), by part."""
    d, t, k = cfg.hidden_size, cfg.tp, cfg.patch_size**2
    c_in = sum(_owned_group_sizes(cfg))
    out: Dict[str, int] = {}
    out["tokenizer"] = c_in * (k * d + d) + c_in * d  # patch embeddings + channel embedding
    agg = 0
    if cfg.partial:
        n_groups = len(_owned_group_sizes(cfg)) if cfg.strategy == "dchag" else cfg.groups
        for n, m in _levels(cfg):
            if cfg.aggregation_layer == "linear":
                agg += n
            else:
                agg += m * d + n_groups * (3 * d * d + 2 * d)
    out["partial_aggregation"] = agg
    out["final_aggregation"] = d + (d * d + d) // t + (2 * d * d + 2 * d) // t + d * d // t + d
    f = cfg.ffn
    per_layer = 4 * d + (3 * d * d + 3 * d) // t + d * d // t + d + (f * d + f) // t + d * f // t + d
    out["backbone"] = cfg.num_layers * per_layer + 2 * d + cfg.num_patches * d  # + final norm, position table
    if cfg.with_head:
        head_channels = sum(max((split_evenly(cfg.num_channels, cfg.groups)[r * (cfg.groups // t):(r + 1) * (cfg.groups // t)]
                                 for r in range(t)), key=sum))
        out["head"] = head_channels * k * (d + 1)
    else:
        out["head"] = 0
    out["total"] = sum(out.values())
    return out


@dataclass
class MemoryEstimate:
    config: MemoryConfig
    params: Dict[str, int]
    parameters: float
    gradients: float
    optimizer: float
    inputs: float
    activations: float  # at the peak moment (activations + temporaries)
    total: float
    peak_phase: str
    phases: Dict[str, float]
    activation_parts: Dict[str, float]

    def fits(self, device_bytes: float, fraction: float = 1.0) -> bool:
        return self.total <= device_bytes * fraction

    def as_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d["config"] = dataclasses.asdict(self.config)
        return d


def _param_state_bytes(cfg: MemoryConfig) -> Tuple[float, float, float, float]:
    """Bytes per parameter: (weights, gradients held, optimizer state, transient in the step)."""
    bf16 = cfg.precision == "bf16"
    weights = 2.0 if bf16 else 4.0
    moments = 8.0 + (4.0 if bf16 else 0.0)  # Adam m, v (+ fp32 master copy)
    if cfg.distributed_optimizer:
        moments /= cfg.data_parallel_size
    if cfg.framework == "megatron":
        grads = 4.0  # persistent main-grad buffer (fp32 for bf16 too)
        step_transient = 0.0
    else:
        grads = weights
        # fp32 copies of the gradients for the master weights; AdamW's fp32 sqrt(v) of every parameter
        step_transient = (4.0 if bf16 else 0.0) + 4.0
    return weights, grads, moments, step_transient


def _largest_param(cfg: MemoryConfig) -> int:
    """Elements of the largest single parameter tensor on the rank with the most channels."""
    d, t, k, f = cfg.hidden_size, cfg.tp, cfg.patch_size**2, cfg.ffn
    sizes = [sum(_owned_group_sizes(cfg)) * k * d, 3 * d * d // t, f * d // t, cfg.num_patches * d]
    if cfg.with_head:
        sizes.append(param_counts(cfg)["head"] // (d + 1) * d)
    if cfg.partial and cfg.aggregation_layer == "cross_attention":
        n_groups = len(_owned_group_sizes(cfg)) if cfg.strategy == "dchag" else cfg.groups
        sizes.append(n_groups * d * d)
    return max(sizes)


def fsdp_unit_params(cfg: MemoryConfig) -> Dict[str, int]:
    """Parameters of one rank per FSDP unit kind: ``channel_stage``, one backbone ``layer``,
    ``head`` and ``root`` (what belongs to no unit)."""
    params = param_counts(cfg)
    d = cfg.hidden_size
    channel = params["tokenizer"] + params["partial_aggregation"] + params["final_aggregation"]
    layer = (params["backbone"] - 2 * d - cfg.num_patches * d) // cfg.num_layers
    return dict(channel_stage=channel, layer=layer, head=params["head"],
                root=params["total"] - channel - cfg.num_layers * layer - params["head"])


def _fsdp_phases(cfg: MemoryConfig, n_params: int, activations: Dict[str, float]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The three moments under FSDP (see the module docstring), and the gradient bytes of each."""
    f, w = cfg.data_parallel_size, (2.0 if cfg.precision == "bf16" else 4.0)
    units = fsdp_unit_params(cfg)
    sharded = n_params * w / f
    optimizer = n_params * (8.0 + (4.0 if cfg.precision == "bf16" else 0.0)) / f
    largest_unit = max(units["channel_stage"], units["layer"], units["head"]) * w
    if cfg.fsdp_reshard_after_forward:
        gathered = units["root"] * w + 2 * largest_unit
    else:
        gathered = n_params * w + largest_unit  # every unit gathered, plus one unsharded gradient
    step_grads = n_params * 4.0 / f
    step_transient = 2 * _largest_param(cfg) * 4.0 / f if cfg.adam_impl == "torch" else 0.0
    channel = units["channel_stage"]
    channel_grads = (n_params - channel) * w / f + channel * w
    base = sharded + optimizer + activations["inputs"]
    phases = {
        "forward_end": base + activations["forward"] + gathered,
        "channel_backward": base + activations["channel_backward"] + units["root"] * w + channel * w + channel_grads,
        "optimizer_step": base + step_grads + step_transient,
    }
    grads = {"forward_end": 0.0, "channel_backward": channel_grads, "optimizer_step": step_grads + step_transient}
    return phases, grads


def estimate_memory(cfg: MemoryConfig) -> MemoryEstimate:
    """Per-rank peak memory (bytes) of a training step, with its breakdown."""
    cfg.validate()
    e = cfg.act_bytes
    d, t, k = cfg.hidden_size, cfg.tp, cfg.patch_size**2
    b = cfg.micro_batch_size
    pos = b * cfg.seq  # token positions
    h_img, w_img = cfg.image_size
    c_in = sum(_owned_group_sizes(cfg))
    c = cfg.num_channels
    params = param_counts(cfg)
    w_b, g_b, o_b, s_b = _param_state_bytes(cfg)
    n_params = params["total"]
    parameters = n_params * w_b
    optimizer = n_params * o_b
    all_grads = n_params * g_b
    channel_params = params["tokenizer"] + params["partial_aggregation"] + params["final_aggregation"]
    # Gradients that exist while the channel stage runs its backward (lazy gradients).
    grads_in_channel_bwd = all_grads if cfg.framework == "megatron" else (n_params - channel_params) * g_b
    if cfg.framework == "torch":
        step_transient = n_params * s_b + _largest_param(cfg) * 4.0
    else:  # megatron: torch AdamW's per-parameter step makes two fp32 temporaries of the largest one
        step_transient = n_params * s_b + (2 * _largest_param(cfg) * 4.0 if cfg.adam_impl == "torch" else 0.0)

    # ---- channel stage -----------------------------------------------------------------------
    # The trainer's batch is fp32 whatever the precision (Float16Module casts it inside the model).
    image_elements = b * c_in * h_img * w_img
    inputs = image_elements * (4 if cfg.framework == "megatron" else e)
    patches = c_in * pos * k * e
    tokens = c_in * pos * d * e
    saved = patches + tokens
    grad = tokens
    agg_saved = 0.0
    if cfg.strategy == "dist_tokenize":
        # The local tokens are freed after the all-gather; the gathered ones (all C) are kept by the
        # final cross-attention, whose backward makes their gradient (all C).
        saved = patches + c * pos * d * e
        grad = c * pos * d * e
    if cfg.partial:
        levels = _levels(cfg)
        for i, (n, m) in enumerate(levels):
            if i > 0:
                agg_saved += n * pos * d * e  # inputs of the upper levels
            if cfg.aggregation_layer == "cross_attention":
                # attention weights [n, P, h], weighted sums [m, P, h, D], values and outputs [m, P, D]
                agg_saved += n * pos * cfg.agg_heads * e + m * pos * cfg.agg_heads * d * e + 2 * m * pos * d * e
            else:
                agg_saved += m * pos * d * e  # level output
        final_tokens = cfg.groups
    else:
        final_tokens = c
    # Textbook final cross-attention: keys/values [N, P, 2D/T] kept until its backward, which then
    # holds three kv-sized gradients (of the key and value slices and their sum) at once.
    kv = final_tokens * pos * 2 * d / t * e if cfg.final_aggregation == "textbook" else 0.0
    fused_work = 0.0
    if cfg.fused:
        # No patches copy, tokens or token gradient; the group tokens come out of one product per
        # group, and the backward works on one block of channels at a time.
        own_groups = levels[-1][1]
        widest = min(max(1, FUSED_BLOCK_CONTRACTION // k), max(_owned_group_sizes(cfg))) * k
        saved, grad = 0.0, 0.0
        agg_saved = own_groups * pos * d * e
        fused_work = pos * widest * e + widest * d * 4 + 2 * own_groups * pos * d * e
        if cfg.framework == "megatron" and cfg.precision == "bf16":
            agg_saved += image_elements * e  # the bf16 copy of the images, kept for the weight gradient
        grads_in_channel_bwd = all_grads
        if cfg.framework == "megatron":  # the tokenizer's weight gradient, until DDP adds it to main_grad
            grads_in_channel_bwd += c_in * k * d * w_b
    if cfg.partial and final_tokens > 1:
        agg_saved += final_tokens * pos * d * e  # gathered group tokens
    # final (folded) cross-attention: weights [N, P, h/T], sums [P, h/T, D], context [P, D/T]
    agg_saved += final_tokens * pos * cfg.agg_heads / t * e + pos * cfg.agg_heads / t * d * e + pos * d / t * e
    channel_saved = saved + agg_saved + kv
    channel_bwd = saved + agg_saved + max(grad, 3 * kv) + fused_work
    small = 6 * pos * d * e  # embedding sums, final norm, loss

    # ---- backbone ----------------------------------------------------------------------------
    per_layer = pos * d * (4 + 12 / t) * e
    if cfg.recompute == "full":
        backbone_fwd = cfg.num_layers * pos * d * e
        backbone_bwd_extra = per_layer + 2 * pos * d * e
    else:
        backbone_fwd = cfg.num_layers * per_layer
        backbone_bwd_extra = 2 * pos * d * e

    # ---- head --------------------------------------------------------------------------------
    head = 0.0
    if cfg.with_head:
        c_head = params["head"] // (k * (d + 1))
        head = 3 * c_head * pos * k * 4  # predictions, targets and their difference (loss in fp32)

    # With channel-stage recompute only its output is held until its backward (the images are
    # counted as inputs); the backward recomputes it, so the channel-backward moment is unchanged.
    channel_held = pos * d * e if cfg.recompute_channel_stage else channel_saved
    phases = {
        # end of forward / backbone backward: every activation alive, no gradients yet (lazy)
        "forward_end": parameters + optimizer + inputs + channel_held + backbone_fwd + backbone_bwd_extra + head + small
        + (all_grads if cfg.framework == "megatron" else 0.0),
        # channel-stage backward: its activations and the token gradient; backbone freed
        "channel_backward": parameters + optimizer + inputs + channel_bwd + small + grads_in_channel_bwd,
        # optimizer step: every gradient, transient fp32 copies
        "optimizer_step": parameters + optimizer + inputs + all_grads + step_transient,
    }
    grads_by_phase = {"forward_end": all_grads if cfg.framework == "megatron" else 0.0,
                      "channel_backward": grads_in_channel_bwd, "optimizer_step": all_grads + step_transient}
    if cfg.fsdp:
        phases, grads_by_phase = _fsdp_phases(cfg, n_params, dict(
            inputs=inputs, forward=channel_held + backbone_fwd + backbone_bwd_extra + head + small,
            channel_backward=channel_bwd + small))
        parameters = n_params * w_b / cfg.data_parallel_size
        optimizer = n_params * (8.0 + (4.0 if cfg.precision == "bf16" else 0.0)) / cfg.data_parallel_size
    peak_phase = max(phases, key=phases.get)
    total = phases[peak_phase]
    grads_at_peak = grads_by_phase[peak_phase]
    # under FSDP this includes the gathered unit buffers
    activations = total - parameters - optimizer - inputs - grads_at_peak
    tokenizer_part = 0.0 if cfg.fused else patches + (0.0 if cfg.strategy == "dist_tokenize" else tokens)
    parts = {
        "tokenizer": tokenizer_part,
        "aggregation": channel_saved - tokenizer_part,
        "channel_backward_gradient": max(grad, 3 * kv) + fused_work,
        "backbone": backbone_fwd + backbone_bwd_extra,
        "head": head,
    }
    return MemoryEstimate(cfg, params, parameters, grads_at_peak, optimizer, inputs, activations, total, peak_phase,
                          phases, parts)


# ------------------------------------------------------------------------------------------------
# Paper scale
# ------------------------------------------------------------------------------------------------

# Backbone sizes for the paper's model sizes (ViT, 32 layers; 12 D^2 parameters per layer):
# 7B: D=4096 (6.4B backbone), 15B: D=6144 (14.5B), 26B: D=8192 (25.8B).
PAPER_MODELS = {
    "1.7B": dict(hidden_size=2048, num_layers=32, num_attention_heads=16),
    "7B": dict(hidden_size=4096, num_layers=32, num_attention_heads=32),
    "15B": dict(hidden_size=6144, num_layers=32, num_attention_heads=48),
    "26B": dict(hidden_size=8192, num_layers=32, num_attention_heads=64),
}


def paper_config(model: str, channels: int, strategy: str, **overrides) -> MemoryConfig:
    """Paper-scale assumptions (see docs/performance.md; every one can be overridden):
    hyperspectral crops 192x384 with patch 6 (2048 patches), micro-batch 4, bf16 with fp32 master
    weights and fp32 main gradients (megatron), TP 8 (one Frontier node, 8 GCDs), data parallel 16
    with the distributed optimizer, full activation recompute of the backbone, G = T, D-CHAG-L
    Tree0, this code's (folded) final cross-attention."""
    base = dict(image_size=(192, 384), patch_size=6, num_channels=channels, strategy=strategy,
                aggregation_layer="linear", aggregation_tree=[], tensor_model_parallel_size=8,
                data_parallel_size=16, distributed_optimizer=True, micro_batch_size=4, precision="bf16",
                framework="megatron", recompute="full")
    base.update(PAPER_MODELS[model])
    base.update(overrides)
    return MemoryConfig(**base)
