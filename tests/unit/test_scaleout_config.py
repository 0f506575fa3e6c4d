"""Scale-out configuration (single process): pipeline layouts, validation rules, channel layout, SP norm."""

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dchag.config import ConfigError, ParallelConfig, load_config
from megatron_dchag.distributed import describe_channel_layout
from megatron_dchag.layers.channel_plan import ChannelGroupPlan
from megatron_dchag.models.encoder import pipeline_layout
from megatron_dchag.models.vit_spec import VitLayerNorm

SMALL = ["parallel.tensor_model_parallel_size=1", "model.num_channels=16", "model.image_size=[16,16]",
         "model.patch_size=4", "model.num_layers=4"]


def test_pipeline_layout_from_layer_split():
    assert pipeline_layout(ParallelConfig(pipeline_model_parallel_size=1, pipeline_layer_split=[4]), 4) is None
    assert pipeline_layout(ParallelConfig(pipeline_model_parallel_size=2), 4) is None  # megatron's even split
    assert pipeline_layout(ParallelConfig(pipeline_model_parallel_size=2, pipeline_layer_split=[1, 3]), 4) == [
        ["embedding", "decoder"], ["decoder"] * 3 + ["loss"]]
    # A first stage with the channel stage only, and an empty last stage holding the head and loss.
    assert pipeline_layout(ParallelConfig(pipeline_model_parallel_size=3, pipeline_layer_split=[0, 4, 0]), 4) == [
        ["embedding"], ["decoder"] * 4, ["loss"]]
    # Interleaved: one count per stage is spread over its virtual stages, in megatron's layer order
    # (virtual stage v of rank p is entry v * PP + p).
    par = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                         pipeline_layer_split=[3, 3])
    assert [row.count("decoder") for row in pipeline_layout(par, 6)] == [2, 2, 1, 1]
    par.pipeline_layer_split = [1, 2, 2, 1]  # one count per virtual stage
    assert [row.count("decoder") for row in pipeline_layout(par, 6)] == [1, 2, 2, 1]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2", "mae.mask_ratio=0.7"],
     "the encoder's 5 visible patches"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=1"], "at least 2"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"],
     "model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=2 x "
     "parallel.virtual_pipeline_model_parallel_size=4"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layer_split=[1,1,2]"],
     "parallel.pipeline_layer_split has 3 entries but needs 2"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layer_split=[5,-1]"], "negative"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "training.micro_batch_size=4"], "multiple of parallel.pipeline_model_parallel_size=2, got 1"),
])
def test_parallel_rules_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
        load_config("configs/hyperspectral/tiny.yaml", SMALL + overrides, world_size=4)


def test_valid_scaleout_configs_pass():
    for overrides in (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
                       "training.micro_batch_size=1", "training.global_batch_size=4"],
                      ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
                      ["parallel.pipeline_model_parallel_size=4", "parallel.pipeline_layer_split=[0,2,2,0]"],
                      # a config trained at scale still evaluates / converts at TP = PP = 1: these are ignored
                      ["parallel.sequence_parallel=true", "parallel.virtual_pipeline_model_parallel_size=2",
                       "parallel.pipeline_layer_split=[1,1,1,1]"]):
        load_config("configs/hyperspectral/tiny.yaml", SMALL + overrides, world_size=4)


def test_settings_without_meaning_in_the_layout_are_ignored():
    from megatron_dchag.models.encoder import make_transformer_config

    cfg = load_config("configs/hyperspectral/tiny.yaml", SMALL + [
        "parallel.sequence_parallel=true", "parallel.virtual_pipeline_model_parallel_size=2"])
    config = make_transformer_config(cfg.model, cfg.parallel, cfg.training)
    assert not config.sequence_parallel and config.virtual_pipeline_model_parallel_size is None


def test_channel_layout_table():
    text = describe_channel_layout(ChannelGroupPlan(500, 8, 4, 2))
    lines = text.splitlines()
    assert lines[0].startswith("Channel layout: 500 channels in G=8 groups (sizes 63 x4, 62 x4), strategy dchag, TP 4")
    assert [line.split()[:4] for line in lines[2:]] == [
        ["0", "0-1", "0-125", "(126)"], ["1", "2-3", "126-251", "(126)"],
        ["2", "4-5", "252-375", "(124)"], ["3", "6-7", "376-499", "(124)"]]
    names = [f"c{i}" for i in range(6)]
    text = describe_channel_layout(ChannelGroupPlan(6, 2, 2, 0), False, "tp_baseline", input_names=names,
                                   output_names=names)
    assert "tokenizes all channels" in text
    assert text.splitlines()[3].split() == ["1", "1", "c0..c5", "(6)", "c3..c5", "(3)"]


def test_vit_layer_norm_marks_parameters_for_sequence_parallel():
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
    on = VitLayerNorm(TransformerConfig(tensor_model_parallel_size=2, sequence_parallel=True, **base), 8, eps=1e-6)
    off = VitLayerNorm(TransformerConfig(**base), 8, eps=1e-6)
    assert all(p.sequence_parallel for p in on.parameters()) and not any(p.sequence_parallel for p in off.parameters())
    x = torch.randn(3, 2, 8)
    # The same torch layer_norm kernel underneath: torch's default float32 tolerance (~10 eps) suffices.
    torch.testing.assert_close(off(x), torch.nn.functional.layer_norm(x, (8,), eps=1e-6))
    assert set(off.state_dict()) == {"weight", "bias"}


def test_config_for_layout_keeps_what_fits_the_target_pipeline():
    from megatron_dchag.config import config_to_dict
    from megatron_dchag.training.checkpoint_conversion import config_for_layout

    saved = config_to_dict(load_config("configs/hyperspectral/tiny.yaml", SMALL + [
        "parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
        "parallel.pipeline_layer_split=[0,2,1,1]", "training.micro_batch_size=1", "training.global_batch_size=4"],
        world_size=2))
    same = config_for_layout(saved, 1, 2).parallel  # the saved VPP and its PP x VPP split still fit
    assert same.virtual_pipeline_model_parallel_size == 2 and same.pipeline_layer_split == [0, 2, 1, 1]
    flat = config_for_layout(saved, 2, 1).parallel  # PP = 1: no interleaving, no split
    assert flat.virtual_pipeline_model_parallel_size is None and flat.pipeline_layer_split is None
    assert flat.tensor_model_parallel_size == 2
    pp4 = config_for_layout(saved, 1, 4).parallel  # 4 entries: one per stage at PP=4, spread over 2 virtual stages
    assert pp4.virtual_pipeline_model_parallel_size == 2 and pp4.pipeline_layer_split == [0, 2, 1, 1]
    pp2 = config_for_layout(saved, 1, 2, None).parallel  # 4 entries fit neither PP=2 nor PP x 1: even split
    assert pp2.virtual_pipeline_model_parallel_size is None and pp2.pipeline_layer_split is None
    # without a split, 4 layers cannot fill PP=4 x VPP=2 virtual stages: the error says the VPP was kept
    saved["parallel"]["pipeline_layer_split"] = None
    with pytest.raises(ConfigError, match=r"virtual pipeline size 2 was kept; give another with --target-virtual"):
        config_for_layout(saved, 1, 4)
    assert config_for_layout(saved, 1, 4, None).parallel.virtual_pipeline_model_parallel_size is None
