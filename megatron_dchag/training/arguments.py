"""Command line of the entry points: ``--config``, dotted overrides, Megatron-style flags.

Precedence, lowest to highest: the YAML file, ``section.field=value`` overrides, then the
Megatron-style flags (``--lr 3e-4`` is the same as ``training.lr=3e-4`` given last).

``--skip-train --load RUN`` without ``--config`` evaluates with the config the run was trained
with (its checkpoint's ``config.yaml``, else ``RUN/config.yaml``) in place of the YAML file, so a
run trained with overrides evaluates without repeating them; overrides and flags still apply on
top (e.g. ``--tensor-model-parallel-size 1 --log-dir DIR``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from megatron_dchag.config import ConfigError, ExperimentConfig, load_config

# flag -> (config path, type). Types: int, float, str, "bool" (store_true).
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": ("parallel.tensor_model_parallel_size", int),
    "--pipeline-model-parallel-size": ("parallel.pipeline_model_parallel_size", int),
    "--micro-batch-size": ("training.micro_batch_size", int),
    "--global-batch-size": ("training.global_batch_size", int),
    "--train-iters": ("training.train_iters", int),
    "--lr": ("training.lr", float),
    "--min-lr": ("training.min_lr", float),
    "--seed": ("training.seed", int),
    "--recompute-granularity": ("training.recompute_granularity", str),
    "--data-path": ("data.data_path", str),
    "--num-workers": ("data.num_workers", int),
    "--save": ("training.save", str),
    "--load": ("training.load", str),
    "--save-interval": ("training.save_interval", int),
    "--eval-interval": ("training.eval_interval", int),
    "--eval-iters": ("training.eval_iters", int),
    "--log-interval": ("training.log_interval", int),
    "--log-dir": ("training.log_dir", str),
    "--exit-duration-in-mins": ("training.exit_duration_in_mins", float),
    "--bf16": ("training.bf16", "bool"),
    "--skip-train": ("training.skip_train", "bool"),
    "--finetune": ("training.finetune", "bool"),
    "--sequence-parallel": ("parallel.sequence_parallel", "bool"),
    "--use-distributed-optimizer": ("parallel.use_distributed_optimizer", "bool"),
    "--overlap-grad-reduce": ("parallel.overlap_grad_reduce", "bool"),
    "--use-torch-fsdp2": ("parallel.use_torch_fsdp2", "bool"),
    "--override-opt-param-scheduler": ("training.override_opt_param_scheduler", "bool"),
    "--peak-tflops": ("training.peak_tflops", float),
    "--wandb-project": ("training.wandb_project", str),
    "--wandb-exp-name": ("training.wandb_exp_name", str),
    "--wandb-save-dir": ("training.wandb_save_dir", str),
}


@dataclass
class RunArguments:
    config: ExperimentConfig
    config_path: Optional[str]
    overrides: List[str]
    debug: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, non-zero status, no usage dump
        from megatron_dchag.config import ConfigError

        raise ConfigError(f"command line: {message}")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    for flag, (path, kind) in MEGATRON_FLAGS.items():
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=f"sets {path}=true")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"sets {path}")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=256")
    return parser


def flag_overrides(namespace: argparse.Namespace) -> List[str]:
    out = []
    for flag, (path, kind) in MEGATRON_FLAGS.items():
        value = getattr(namespace, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        out.append(f"{path}={'true' if kind == 'bool' else value}")
    return out


# The saved run's own outputs and mode: an evaluation of it writes only where its flags say.
_RUN_ONLY_FIELDS = ("save", "load", "log_dir", "skip_train", "finetune", "save_interval", "exit_duration_in_mins",
                    "override_opt_param_scheduler", "wandb_project", "wandb_exp_name", "wandb_save_dir")


def saved_run_config(load: str) -> Tuple[Dict[str, Any], str]:
    """``(config tree, where it was read)``: the config the run at ``load`` was trained with, its
    checkpoint's ``config.yaml``, else ``load/config.yaml``; without the fields of
    :data:`_RUN_ONLY_FIELDS`."""
    from megatron_dchag.training.checkpoint_paths import read_checkpoint_config, resolve_checkpoint_dir

    checkpoint = resolve_checkpoint_dir(load)  # CheckpointError when there is no checkpoint to load
    tree, where = read_checkpoint_config(checkpoint), os.path.join(checkpoint, "config.yaml")
    if tree is None and os.path.isfile(os.path.join(load, "config.yaml")):
        where = os.path.join(load, "config.yaml")
        with open(where) as fh:
            tree = yaml.safe_load(fh)
    if not isinstance(tree, dict):
        raise ConfigError(f"--skip-train --load {load}: the run saved no config (looked for {where}); give --config")
    training = dict(tree.get("training") or {})
    for name in _RUN_ONLY_FIELDS:
        training.pop(name, None)
    return dict(tree, training=training), where


def parse_run_arguments(
    argv: Sequence[str], description: str, world_size: Optional[int] = None,
    workload_sections: Optional[Sequence[str]] = None,
) -> RunArguments:
    """Parse and validate; raises ConfigError (one line naming the field) on bad input.
    ``workload_sections``: the config sections of the workload (``Task.config_sections``)."""
    ns = build_parser(description).parse_intermixed_args(list(argv))
    overrides = list(ns.overrides) + flag_overrides(ns)
    base, base_path = None, None
    if ns.config is None and ns.skip_train and ns.load:
        base, base_path = saved_run_config(ns.load)
    try:
        cfg = load_config(ns.config, overrides, world_size=world_size, workload_sections=workload_sections,
                          base=base)
    except ConfigError as exc:
        if base_path is None:
            raise
        raise ConfigError(f"{exc} (with the config saved by the run, {base_path}; flags and overrides apply on top, "
                          "or give --config)") from None
    return RunArguments(config=cfg, config_path=ns.config or base_path, overrides=overrides, debug=ns.debug)

