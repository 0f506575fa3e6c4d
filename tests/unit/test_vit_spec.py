"""The SDPA core attention equals textbook softmax attention, bidirectional by default."""

import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dchag.models.vit_spec import SDPACoreAttention, get_vit_layer_spec, transformer_engine_available
from tests.tolerances import FLOAT32_REL, assert_close_scaled


def test_sdpa_core_attention_matches_manual():
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                            attention_dropout=0.0)
    core = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self")
    torch.manual_seed(0)
    s, b, h, d = 5, 2, 4, 4
    q, k, v = (torch.randn(s, b, h, d) for _ in range(3))
    out = core(q, k, v, attention_mask=None)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    ref = torch.einsum("bhst,tbhd->sbhd", torch.softmax(scores, -1), v).reshape(s, b, h * d)
    # SDPA vs explicit einsum/softmax kernels: relative to the largest output.
    assert_close_scaled(out, ref, FLOAT32_REL, "SDPA vs textbook attention")


def test_spec_selection_without_te():
    spec = get_vit_layer_spec("auto")
    attn = spec.submodules.self_attention
    assert attn.params["attn_mask_type"] == AttnMaskType.no_mask
    if not transformer_engine_available():
        assert attn.submodules.core_attention is SDPACoreAttention


def test_mlp_spec_follows_the_installed_megatron_core():
    """On releases whose TransformerLayer rewraps a ModuleSpec(MLP) into ``MLP.as_mlp_submodule``
    (with a warning per build), the spec gives that builder itself; elsewhere a ModuleSpec. Fails
    when a release outside the recorded range gains or loses ``as_mlp_submodule``."""
    import functools
    import inspect

    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_dchag.compat.megatron import MEGATRON_CORE_VERSION, MLP_AS_SUBMODULE_VERSIONS

    in_range = MEGATRON_CORE_VERSION in MLP_AS_SUBMODULE_VERSIONS
    assert hasattr(MLP, "as_mlp_submodule") == in_range, MEGATRON_CORE_VERSION
    mlp = get_vit_layer_spec("local").submodules.mlp
    if in_range:
        assert "as_mlp_submodule" in inspect.getsource(TransformerLayer.__init__)
        assert isinstance(mlp, functools.partial) and mlp.func == MLP.as_mlp_submodule
    else:
        assert isinstance(mlp, ModuleSpec) and mlp.module is MLP
