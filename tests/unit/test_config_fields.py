"""Every config field has a rule, and the resolve step derives each default once.

``test_every_field_has_a_rule`` walks every field of every section: a field added without an entry
in ``INVALID`` (and so, presumably, without a rule) fails it. Each entry is an invalid value that
:func:`load_config` must refuse, before any compute, with a :class:`ConfigError` naming the field
(``section.field``) and the rule.
"""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_dchag.config import (
    ConfigError,
    ExperimentConfig,
    build_dataclass,
    config_to_dict,
    data_parallel_size,
    dump_config,
    load_config,
    resolve_config,
    run_shape,
)

REPO = Path(__file__).resolve().parents[2]
TINY_MAE = str(REPO / "configs/hyperspectral/tiny.yaml")
NOT_BOOL = ("maybe", "must be true or false")

# "section.field" -> [(value, the rule as the message words it, extra overrides for context)]
INVALID = {
    "model.num_channels": [("0", "must be a positive integer", [])],
    "model.image_size": [("[30, 32]", "height=30 is not divisible by model.patch_size=8", [])],
    "model.patch_size": [("0", "must be a positive integer", [])],
    "model.hidden_size": [("130", "is not divisible by model.num_attention_heads=4", [])],
    "model.num_layers": [("0", "must be a positive integer", [])],
    "model.num_attention_heads": [("0", "must be a positive integer", []),
                                  ("3", "is not divisible by parallel.tensor_model_parallel_size=2",
                                   ["parallel.tensor_model_parallel_size=2", "model.hidden_size=96",
                                    "model.aggregation_heads=2", "mae.decoder_num_attention_heads=2"])],
    "model.ffn_hidden_size": [("0", "must be a positive integer", []),
                              ("511", "is not divisible by parallel.tensor_model_parallel_size=2",
                               ["parallel.tensor_model_parallel_size=2"])],
    "model.channel_groups": [("0", "must be a positive integer", []),
                             ("3", "is not divisible by parallel.tensor_model_parallel_size=2",
                              ["parallel.tensor_model_parallel_size=2"])],
    "model.strategy": [("dchagg", "is not one of dchag, tp_baseline, dist_tokenize, hierarchical", [])],
    "model.aggregation_layer": [("conv", "is not one of linear, cross_attention", [])],
    "model.aggregation_tree": [("[1]", "must be at least 2", []),
                               ("[64]", "does not fit", ["model.channel_groups=2"])],
    "model.aggregation_heads": [("0", "must be a positive integer", []), ("3", "is not divisible", [])],
    "model.channel_embedding": [("position", "is not one of index, wavelength", [])],
    "model.wavelengths": [("[400, 500]", "has 2 values but model.num_channels=64", []),
                          ("[400, -1]", "must be positive wavelengths in nm", ["model.num_channels=2"])],
    "model.layernorm_epsilon": [("0", "must be a finite number > 0", [])],
    "model.hidden_dropout": [("1.0", "must be in [0, 1)", [])],
    "model.attention_dropout": [("-0.1", "must be in [0, 1)", [])],
    "model.transformer_impl": [("te", "is not one of local, transformer_engine, auto", [])],
    "model.lead_time_embedding": [NOT_BOOL + ([],)],
    "model.init_method_std": [("-1", "must be a finite number > 0", [])],
    "model.channel_stage_impl": [("fast", "is not one of auto, fused, reference", []),
                                 ("fused", "needs a linear partial-aggregation tree",
                                  ["model.aggregation_layer=cross_attention"]),
                                 ("fused", "needs a linear partial-aggregation tree", ["model.strategy=tp_baseline"])],
    "mae.mask_ratio": [("1.0", "must be in [0, 1)", [])],
    "mae.decoder_hidden_size": [("0", "must be a positive integer", [])],
    "mae.decoder_num_layers": [("0", "must be a positive integer", [])],
    "mae.decoder_num_attention_heads": [("0", "must be a positive integer", []),
                                        ("3", "is not divisible by mae.decoder_num_attention_heads=3", [])],
    "mae.norm_pix_loss": [NOT_BOOL + ([],)],
    "forecast.max_lead_hours": [("70", "is not forecast.min_lead_hours=6 plus a multiple", []),
                                ("0", "must be >= forecast.min_lead_hours=6", [])],
    "forecast.lead_step_hours": [("0", "must be a positive integer", [])],
    "forecast.min_lead_hours": [("0", "must be a positive integer", [])],
    "forecast.eval_lead_hours": [("[]", "is empty", []), ("[0, 24]", "must be positive hours", []),
                                 ("[6, 6]", "repeats a lead time", [])],
    "forecast.output_channels": [("[]", "is empty (leave it unset to predict every input channel)", []),
                                 ("[t2m, t2m]", "repeats t2m", [])],
    "forecast.metric_variables": [("[z_500, z_500]", "repeats z_500", []), ("['']", "is an empty name", [])],
    "forecast.latitude_weighting": [("gaussian", "is not one of cos, area", [])],
    "forecast.residual": [NOT_BOOL + ([],)],
    "forecast.loss_on_constants": [NOT_BOOL + ([],)],
    "forecast.acc_centered": [NOT_BOOL + ([],)],
    "forecast.time_features": [NOT_BOOL + ([],)],
    "segmentation.mode": [("probe", "is not one of finetune, linear_probe", [])],
    "segmentation.pretrained": [("''", "is empty", [])],
    "segmentation.num_classes": [("1", "must be >= 2", [])],
    "segmentation.class_names": [("[a, a]", "repeats a", []),
                                 ("[a, b]", "has 2 names but segmentation.num_classes=3", ["segmentation.num_classes=3"])],
    "segmentation.label_dataset": [("' '", "is empty", [])],
    "segmentation.ignore_index": [("1", "is a class label", ["segmentation.num_classes=3"]),
                                  ("x", "must be an integer", [])],
    "segmentation.encoder_lr_multiplier": [("0", "must be in (0, 1]", []), ("1.5", "must be in (0, 1]", [])],
    "parallel.tensor_model_parallel_size": [("0", "must be a positive integer", [])],
    "parallel.pipeline_model_parallel_size": [("0", "must be a positive integer", [])],
    "parallel.sequence_parallel": [NOT_BOOL + ([],)],
    "parallel.use_distributed_optimizer": [NOT_BOOL + ([],)],
    "parallel.overlap_grad_reduce": [NOT_BOOL + ([],)],
    "parallel.pipeline_layer_split": [("[3, -1]", "has a negative layer count", []),
                                      ("[1]", "has 1 entries but needs 2",
                                       ["parallel.pipeline_model_parallel_size=2"])],
    "parallel.virtual_pipeline_model_parallel_size": [("1", "must be at least 2", [])],
    "parallel.use_torch_fsdp2": [NOT_BOOL + ([],),
                                 ("true", "needs parallel.pipeline_model_parallel_size=1",
                                  ["parallel.pipeline_model_parallel_size=2"]),
                                 ("true", "cannot be combined with parallel.use_distributed_optimizer=true",
                                  ["parallel.use_distributed_optimizer=true"]),
                                 ("true", "cannot be combined with parallel.overlap_grad_reduce=true",
                                  ["parallel.overlap_grad_reduce=true"])],
    "parallel.fsdp_reshard_after_forward": [NOT_BOOL + ([],)],
    "data.data_path": [("''", "is empty", [])],
    "data.stats_file": [("''", "is empty", [])],
    "data.file_format": [("tiff", "is not one of auto, hdf5, envi", [])],
    "data.dataset_name": [("' '", "is empty", [])],
    "data.layout": [("XYZ", "is not one of CHW, HWC", [])],
    "data.channels": [("[]", "is empty", []), ("[t2m, t2m]", "repeats t2m", [])],
    "data.val_fraction": [("1.5", "must be in [0, 1)", []), ("-0.1", "must be in [0, 1)", [])],
    "data.val_files": [("[]", "is empty (leave it unset for the val_fraction split)", []),
                       ("[a, a]", "repeats a", []), ("cubes/val", "must be a list", [])],
    "data.test_files": [("[]", "is empty (leave it unset for no test cubes)", []),
                        ("[tile_1]", "repeats 'tile_1' of data.val_files", ["data.val_files=[tile_1, tile_2]"])],
    "data.nodata": [("ignore", "is not one of error, fill, mask", [])],
    "data.num_workers": [("-1", "must be >= 0", [])],
    "data.ensemble_member": [("first", "must be a member index (0, 1, ...) or mean", []),
                             ("-1", "must be a member index (0, 1, ...) or mean", [])],
    "training.micro_batch_size": [("0", "must be a positive integer", [])],
    "training.global_batch_size": [("0", "must be a positive integer", []),
                                   ("3", "is not divisible by training.micro_batch_size=2", [])],
    "training.train_iters": [("-1", "must be >= 0", [])],
    "training.lr": [("-1", "must be >= 0", [])],
    "training.min_lr": [("-1", "must be >= 0", []), ("0.01", "must be <= training.lr=0.001", [])],
    "training.lr_warmup_iters": [("-1", "must be >= 0", [])],
    "training.lr_decay_style": [("bogus", "is not one of constant, linear, cosine, inverse-square-root", [])],
    "training.weight_decay": [("-0.1", "must be >= 0", [])],
    "training.adam_beta1": [("2", "must be in [0, 1)", [])],
    "training.adam_beta2": [("1.0", "must be in [0, 1)", [])],
    "training.adam_eps": [("0", "must be a finite number > 0", [])],
    "training.clip_grad": [("-1", "must be >= 0", [])],
    "training.bf16": [NOT_BOOL + ([],)],
    "training.recompute_granularity": [("partial", "is not one of None, full, selective, channel_stage", [])],
    "training.seed": [("-1", "must be >= 0", [])],
    "training.eval_interval": [("-1", "must be >= 0", [])],
    "training.eval_iters": [("-1", "must be >= 0", [])],
    "training.log_interval": [("0", "must be a positive integer", [])],
    "training.save": [("''", "is empty", [])],
    "training.load": [("''", "is empty", [])],
    "training.save_interval": [("0", "must be a positive integer", [])],
    "training.log_dir": [("''", "is empty", [])],
    "training.exit_duration_in_mins": [("0", "must be a finite number > 0", [])],
    "training.skip_train": [NOT_BOOL + ([],)],
    "training.finetune": [NOT_BOOL + ([],)],
    "training.max_consecutive_nonfinite": [("0", "must be a positive integer", [])],
    "training.keep_last_checkpoints": [("0", "must be a positive integer", [])],
    "training.override_opt_param_scheduler": [NOT_BOOL + ([],)],
    "training.peak_tflops": [("0", "must be a finite number > 0", []), ("-989", "must be a finite number > 0", [])],
    "training.wandb_project": [("''", "is empty", [])],
    "training.wandb_exp_name": [("' '", "is empty", [])],
    "training.wandb_save_dir": [("''", "is empty", [])],
}

CASES = [(name, value, rule, extra) for name, cases in INVALID.items() for value, rule, extra in cases]


def _all_fields():
    sections = typing.get_type_hints(ExperimentConfig)
    for section in dataclasses.fields(ExperimentConfig):
        for f in dataclasses.fields(sections[section.name]):
            yield f"{section.name}.{f.name}"


def test_every_field_has_a_rule():
    fields = list(_all_fields())
    missing = [name for name in fields if name not in INVALID]
    assert not missing, f"fields without an invalid example (and a rule): {missing}"
    assert not set(INVALID) - set(fields), "examples for fields that do not exist"


@pytest.mark.parametrize("name, value, rule, extra", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_invalid_value_is_refused_naming_field_and_rule(name, value, rule, extra):
    load_config(None, extra)  # the context alone is valid
    with pytest.raises(ConfigError) as info:
        load_config(None, [*extra, f"{name}={value}"], world_size=1)
    message = str(info.value)
    assert name in message and rule in message, message
    assert "\n" not in message


@pytest.mark.parametrize("override, message", [
    ("training.log_interval=0", "training.log_interval=0 must be a positive integer"),
    ("training.lr_decay_style=bogus", "training.lr_decay_style='bogus' is not one of"),
    ("training.adam_beta1=2", "training.adam_beta1=2.0 must be in [0, 1)"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 must be in [0, 1)"),
    ("data.layout=XYZ", "data.layout='XYZ' is not one of CHW, HWC"),
    ("training.save_interval=0", "training.save_interval=0 must be a positive integer"),
    ("model.init_method_std=-1", "model.init_method_std=-1.0 must be a finite number > 0"),
])
def test_values_that_used_to_pass(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_MAE, [override])
    assert message in str(info.value)


def test_every_megatron_decay_style_that_the_trainer_can_run_is_accepted():
    for style in ("constant", "linear", "cosine", "inverse-square-root"):
        assert load_config(None, [f"training.lr_decay_style={style}"]).training.lr_decay_style == style
    with pytest.raises(ConfigError, match="'WSD' is not one of"):
        load_config(None, ["training.lr_decay_style=WSD"])


@pytest.mark.parametrize("path, sections", [("configs/hyperspectral/tiny.yaml", ("mae",)),
                                            ("configs/hyperspectral/paper.yaml", ("mae",)),
                                            ("configs/hyperspectral/segmentation_tiny.yaml", ("segmentation",)),
                                            ("configs/era5/tiny.yaml", ("forecast",)),
                                            ("configs/era5/paper.yaml", ("forecast",))])
def test_shipped_configs_pass(path, sections):
    load_config(str(REPO / path), ["data.data_path=x", "data.stats_file=y"], workload_sections=sections)


def test_rules_that_allow_zero_or_none():
    cfg = load_config(None, ["training.eval_interval=0", "training.eval_iters=0", "training.clip_grad=0",
                             "training.train_iters=0", "data.num_workers=0", "data.val_fraction=0",
                             "training.save_interval=null", "forecast.metric_variables=[]"])
    assert cfg.training.eval_interval == 0 and cfg.training.save_interval is None


def test_loading_and_validating_needs_no_torch():
    code = (
        "import sys\n"
        "from megatron_dchag.config import ConfigError, load_config, resolve_config, run_shape\n"
        "cfg = resolve_config(load_config('configs/era5/tiny.yaml', world_size=2))\n"
        "run_shape(cfg, 1)\n"
        "try:\n"
        "    load_config('configs/hyperspectral/tiny.yaml', ['training.log_interval=0'])\n"
        "except ConfigError:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'megatron') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# resolve
# ------------------------------------------------------------------------------------------------


def test_resolve_fills_each_default_once_and_keeps_explicit_values():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2", "model.hidden_size=96",
                             "model.num_attention_heads=6", "model.num_channels=8", "mae.decoder_num_attention_heads=2",
                             "forecast.lead_step_hours=12", "forecast.max_lead_hours=48"])
    assert cfg.model.channel_groups is None and cfg.model.ffn_hidden_size is None
    resolved = resolve_config(cfg)
    m = resolved.model
    assert (m.channel_groups, m.ffn_hidden_size, m.aggregation_heads) == (2, 384, 6)
    assert resolved.forecast.min_lead_hours == 12
    assert cfg.model.channel_groups is None  # a copy: the loaded config is as written
    assert resolve_config(resolved) == resolved  # idempotent
    explicit = resolve_config(load_config(None, ["model.channel_groups=4", "model.ffn_hidden_size=64",
                                                 "model.aggregation_heads=2", "forecast.min_lead_hours=12",
                                                 "forecast.max_lead_hours=72"]))
    m = explicit.model
    assert (m.channel_groups, m.ffn_hidden_size, m.aggregation_heads) == (4, 64, 2)
    assert explicit.forecast.min_lead_hours == 12
    # the saved config.yaml records the explicit values
    assert "channel_groups: 2" in dump_config(resolved) and "ffn_hidden_size: 384" in dump_config(resolved)


def test_run_shape_global_batch_and_micro_batches():
    cfg = load_config(None, ["training.micro_batch_size=2", "parallel.tensor_model_parallel_size=2",
                             "model.image_size=[16,16]", "model.patch_size=4", "mae.mask_ratio=0.75"])
    assert data_parallel_size(cfg.parallel, 8) == 4
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tensor_model_parallel_size=2"):
        data_parallel_size(cfg.parallel, 3)
    shape = run_shape(cfg, 4)  # global batch default: micro x DP
    assert (shape.global_batch_size, shape.num_microbatches, shape.data_parallel_size) == (8, 1, 4)
    assert (shape.num_patches, shape.visible_patches, shape.masked_patches) == (16, 4, 12)
    assert cfg.training.global_batch_size is None  # stays as written: it means micro x DP at any DP
    cfg.training.global_batch_size = 16
    assert run_shape(cfg, 2).num_microbatches == 4 and run_shape(cfg, 4).num_microbatches == 2
    with pytest.raises(ConfigError, match="training.global_batch_size=16 is not divisible by training.micro_batch_size"
                                          "=2 x data-parallel size 3"):
        run_shape(cfg, 3)
    cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size = 4, 2
    with pytest.raises(ConfigError, match="multiple of parallel.pipeline_model_parallel_size=4, got 2"):
        run_shape(cfg, 4)


def _old_saved_config():
    """A checkpoint's config.yaml as saved before the defaults were recorded: nulls, trained at TP=2."""
    saved = config_to_dict(load_config(TINY_MAE, ["model.channel_groups=null"]))
    assert saved["model"]["channel_groups"] is None and saved["model"]["ffn_hidden_size"] is None
    assert saved["parallel"]["tensor_model_parallel_size"] == 2
    return saved


def test_old_saved_config_resolves_with_its_saved_tp_size():
    resolved = resolve_config(build_dataclass(ExperimentConfig, _old_saved_config()))
    m = resolved.model
    assert (m.channel_groups, m.ffn_hidden_size, m.aggregation_heads) == (2, 256, 4)
    from megatron_dchag.training.checkpoint_conversion import config_for_layout

    for tp in (1, 2):  # converting keeps the G the checkpoint was trained with
        target = config_for_layout(_old_saved_config(), tp, 1, task="hyperspectral_mae")
        assert target.model.channel_groups == 2 and target.model.ffn_hidden_size == 256
        assert target.parallel.tensor_model_parallel_size == tp


def test_architecture_check_treats_old_nulls_as_their_resolved_values():
    from megatron_dchag.training.checkpointing import CheckpointError
    from megatron_dchag.training.trainer import Trainer

    saved = _old_saved_config()
    task = SimpleNamespace(checkpoint_differences=lambda saved_config: [])
    for tp in (1, 2):  # the checkpoint's TP=2 G, now loaded at TP=1 or 2 with G=2 explicit
        ours = resolve_config(load_config(TINY_MAE, [
            "model.channel_groups=2", f"parallel.tensor_model_parallel_size={tp}"]))
        Trainer._check_architecture(SimpleNamespace(cfg=ours, task=task), saved, "ckpt")
    # a newer checkpoint (explicit values) against a config as loaded (nulls): no difference either
    new_saved = config_to_dict(resolve_config(build_dataclass(ExperimentConfig, saved)))
    as_loaded = load_config(TINY_MAE, ["model.channel_groups=2"])
    assert as_loaded.model.ffn_hidden_size is None
    Trainer._check_architecture(SimpleNamespace(cfg=as_loaded, task=task), new_saved, "ckpt")
    other = resolve_config(load_config(TINY_MAE, ["model.channel_groups=4"]))
    with pytest.raises(CheckpointError, match="model.channel_groups: checkpoint 2 vs config 4"):
        Trainer._check_architecture(SimpleNamespace(cfg=other, task=task), saved, "ckpt")
