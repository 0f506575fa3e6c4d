"""The ``forecast`` config section: its rules, and workload sections that do not apply to a run."""

import pytest

from megatron_dchag.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("forecast.lead_step_hours=0", "forecast.lead_step_hours=0 must be a positive integer"),
        ("forecast.max_lead_hours=70", "forecast.max_lead_hours=70 is not forecast.min_lead_hours=6 plus a multiple"),
        ("forecast.min_lead_hours=96", "forecast.max_lead_hours=72 must be >= forecast.min_lead_hours=96"),
        ("forecast.eval_lead_hours=[]", "forecast.eval_lead_hours is empty"),
        ("forecast.eval_lead_hours=[6,6]", "repeats a lead time"),
        ("forecast.eval_lead_hours=[0,24]", "must be positive hours"),
        ("forecast.latitude_weighting=gaussian", "forecast.latitude_weighting='gaussian' is not one of cos, area"),
        ("forecast.lead_time=6", "unknown config field 'forecast.lead_time'"),
    ],
)
def test_forecast_rules_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/era5/tiny.yaml", [override])
    assert message in str(info.value)


def test_unused_workload_sections_are_not_validated():
    """The MAE decoder's defaults (4 heads) must not stop a forecasting run at TP=8, and vice versa."""
    with pytest.raises(ConfigError, match="mae.decoder_num_attention_heads=4 is not divisible"):
        load_config("configs/era5/paper.yaml", ["parallel.tensor_model_parallel_size=8", "data.data_path=x",
                                                "data.stats_file=y"])
    cfg = load_config("configs/era5/paper.yaml", ["parallel.tensor_model_parallel_size=8", "data.data_path=x",
                                                  "data.stats_file=y"], workload_sections=("forecast",))
    assert cfg.parallel.tensor_model_parallel_size == 8
    cfg = load_config("configs/hyperspectral/tiny.yaml", ["forecast.lead_step_hours=0"], workload_sections=("mae",))
    assert cfg.forecast.lead_step_hours == 0
    for name in ("tiny", "paper"):
        cfg = load_config(f"configs/era5/{name}.yaml", ["data.data_path=x", "data.stats_file=y"])
        assert cfg.model.lead_time_embedding and cfg.model.num_channels == 80 and cfg.model.image_size == (32, 64)
