"""Layer specs for a bidirectional (no causal mask) ViT layer built from megatron-core modules.

- :func:`get_vit_layer_local_spec`: megatron-core ``TransformerLayer`` with column/row-parallel
  linears and :class:`SDPACoreAttention`, a small core attention calling
  ``torch.nn.functional.scaled_dot_product_attention`` (CPU, ROCm and CUDA; no Transformer Engine).
- :func:`get_vit_layer_te_spec`: the Transformer-Engine version, available only when TE imports.
- :func:`get_vit_layer_spec` picks one from ``model.transformer_impl`` (``auto`` = TE if present).
- :func:`get_vit_block_spec`: the whole ``TransformerBlock`` of one pipeline stage (its layers and
  the final norm), for a given config and virtual pipeline stage.
- :class:`VitLayerNorm`: the local spec's norm, a ``torch.nn.LayerNorm`` that also works under
  sequence parallelism (megatron's torch fallback ``WrappedTorchNorm`` refuses it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import divide

from megatron_dchag.compat.megatron import mlp_submodule_spec


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import megatron.core.extensions.transformer_engine  # noqa: F401
    except Exception:  # ImportError, or TE present but broken (common on MI250X)
        return False
    return True


class SDPACoreAttention(MegatronModule):
    """Core attention with ``scaled_dot_product_attention``; bidirectional unless a mask is given.

    Takes megatron's ``[s, b, heads_local, head_dim]`` query/key/value and returns
    ``[s, b, heads_local * head_dim]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.query_groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        rep = self.heads_per_partition // self.query_groups_per_partition
        if rep > 1:
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # megatron masks are True where attention is *not* allowed
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=(mask is None and mask_type == AttnMaskType.causal), scale=self.softmax_scale,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class VitLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built from megatron's norm arguments; works with sequence parallelism.

    Under sequence parallelism each TP rank normalizes its own slice of the sequence, so the
    gradients of the (replicated) weight and bias are partial sums. Marking them
    ``sequence_parallel=True`` makes megatron's ``finalize_model_grads`` all-reduce them over the
    TP group, as it does for its fused norms. Without sequence parallelism this is exactly
    ``torch.nn.LayerNorm`` (same parameters, same state-dict keys as ``WrappedTorchNorm``).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "LayerNorm"):
        if config.normalization != "LayerNorm":
            raise ValueError(f"VitLayerNorm implements LayerNorm only, not {config.normalization}")
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("VitLayerNorm supports neither zero-centered gamma, persist_layer_norm nor "
                             "memory_efficient_layer_norm")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.sequence_parallel = bool(config.sequence_parallel)
        for param in self.parameters():
            setattr(param, "sequence_parallel", self.sequence_parallel)


def _local_norm():
    """apex's fused layer norm when present (not required), else :class:`VitLayerNorm`."""
    try:
        from megatron.core.fusions.fused_layer_norm import HAVE_FUSED_LAYER_NORM, FusedLayerNorm

        if HAVE_FUSED_LAYER_NORM:
            return FusedLayerNorm
    except ImportError:
        pass
    return VitLayerNorm


def get_vit_layer_local_spec() -> ModuleSpec:
    """Bidirectional ViT layer: pre-norm attention + MLP, megatron-core TP linears, SDPA core."""
    norm = _local_norm()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_submodule_spec(MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_vit_layer_te_spec() -> ModuleSpec:
    """Transformer-Engine ViT layer (fused layernorm-linear, TE attention without a causal mask)."""
    if not transformer_engine_available():
        raise RuntimeError("Transformer Engine is not importable; use model.transformer_impl=local")
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=mlp_submodule_spec(
                MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _uses_te(transformer_impl: str) -> bool:
    return transformer_impl == "transformer_engine" or (transformer_impl == "auto" and transformer_engine_available())


def get_vit_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    if _uses_te(transformer_impl):
        return get_vit_layer_te_spec()
    return get_vit_layer_local_spec()


def get_vit_block_spec(config: TransformerConfig, transformer_impl: str = "local",
                       vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (virtual stage ``vp_stage``) plus the final norm.

    The number of layers follows ``config`` (even split, or ``pipeline_model_parallel_layout``).
    The final norm is the same kind as the layers' norms, so the whole block works under
    sequence parallelism (megatron's default final norm falls back to ``WrappedTorchNorm``).
    """
    layer = get_vit_layer_spec(transformer_impl)
    if _uses_te(transformer_impl):
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = _local_norm()
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)
