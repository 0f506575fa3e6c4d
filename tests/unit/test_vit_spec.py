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
