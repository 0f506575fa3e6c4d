"""Config loading, overrides and the validation rules (each error names the field and the rule)."""

import pytest

from megatron_dchag.config import ConfigError, ExperimentConfig, dump_config, load_config, validate_config


def _cfg(*overrides, world_size=None):
    return load_config(None, list(overrides), world_size=world_size)


def test_defaults_validate_and_roundtrip_yaml(tmp_path):
    cfg = _cfg()
    assert isinstance(cfg, ExperimentConfig)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


def test_yaml_overrides_and_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("DCHAG_DATA", "/scratch/cubes")
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  image_size: [32, 48]\ndata:\n  data_path: ${oc.env:DCHAG_DATA}\n")
    cfg = load_config(str(path), ["model.aggregation_tree=[4, 2]", "training.lr=3e-4", "model.num_channels=40"])
    assert cfg.model.hidden_size == 64 and cfg.model.image_size == (32, 48)
    assert cfg.model.aggregation_tree == [4, 2] and cfg.training.lr == 3e-4
    assert cfg.data.data_path == "/scratch/cubes"


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["model.channel_groups=6", "parallel.tensor_model_parallel_size=4", "model.num_attention_heads=8"], None,
         "model.channel_groups=6 is not divisible by parallel.tensor_model_parallel_size=4"),
        (["model.num_channels=3", "model.channel_groups=4"], None,
         "model.num_channels=3 is smaller than model.channel_groups=4"),
        (["model.hidden_size=130", "model.num_attention_heads=4"], None,
         "model.hidden_size=130 is not divisible by model.num_attention_heads=4"),
        (["model.num_attention_heads=6", "model.hidden_size=96", "parallel.tensor_model_parallel_size=4",
          "model.channel_groups=4"], None,
         "model.num_attention_heads=6 is not divisible by parallel.tensor_model_parallel_size=4"),
        (["model.strategy=dchagg"], None, "model.strategy='dchagg' is not one of"),
        (["model.aggregation_layer=conv"], None, "model.aggregation_layer='conv' is not one of"),
        (["model.num_channels=64", "model.channel_groups=2", "model.aggregation_tree=[64]"], None,
         "model.aggregation_tree[0]=64 does not fit"),
        (["model.aggregation_tree=[1]"], None, "model.aggregation_tree[0]=1 must be at least 2"),
        (["model.image_size=[30, 32]", "model.patch_size=8"], None, "not divisible by model.patch_size=8"),
        (["model.hidden_sise=3"], None, "unknown config field 'model.hidden_sise' (did you mean 'hidden_size'?)"),
        (["parallel.tensor_model_parallel_size=2", "model.num_channels=8"], 3,
         "world size 3 is not divisible by tensor_model_parallel_size=2"),
        (["training.global_batch_size=6", "training.micro_batch_size=4"], 1,
         "training.global_batch_size=6 is not divisible by training.micro_batch_size=4"),
        (["model.hidden_size=abc"], None, "model.hidden_size='abc' must be an integer"),
    ],
)
def test_bad_configs_fail_with_named_field(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides, world_size=world)
    assert message in str(err.value)


def test_strategy_switches():
    cfg = _cfg()
    table = {"dchag": (True, True), "tp_baseline": (False, False), "dist_tokenize": (True, False),
             "hierarchical": (False, True)}
    for strategy, (shards, partial) in table.items():
        cfg.model.strategy = strategy
        validate_config(cfg)
        assert (cfg.model.shards_channels, cfg.model.uses_partial_aggregation) == (shards, partial)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
