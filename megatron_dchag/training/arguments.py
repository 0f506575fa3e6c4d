"""Command line of the entry points: ``--config``, dotted overrides, Megatron-style flags.

Precedence, lowest to highest: the YAML file, ``section.field=value`` overrides, then the
Megatron-style flags (``--lr 3e-4`` is the same as ``training.lr=3e-4`` given last).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_dchag.config import ExperimentConfig, load_config

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


def parse_run_arguments(
    argv: Sequence[str], description: str, world_size: Optional[int] = None,
    workload_sections: Optional[Sequence[str]] = None,
) -> RunArguments:
    """Parse and validate; raises ConfigError (one line naming the field) on bad input.
    ``workload_sections``: the config sections of the workload (``Task.config_sections``)."""
    ns = build_parser(description).parse_intermixed_args(list(argv))
    overrides = list(ns.overrides) + flag_overrides(ns)
    cfg = load_config(ns.config, overrides, world_size=world_size, workload_sections=workload_sections)
    return RunArguments(config=cfg, config_path=ns.config, overrides=overrides, debug=ns.debug)


def wants_debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv
