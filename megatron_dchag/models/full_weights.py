"""Full (unsharded) weights <-> this rank's tensor-parallel pieces, for any TP size.

Three kinds of parameters exist in a model:

- megatron-core TP parameters (``tensor_model_parallel=True``, ``partition_dim``): even chunks;
- group-owned parameters (a :class:`~megatron_dchag.layers.channel_plan.GroupShardedLayout`):
  the concatenation of the owned channel groups' blocks;
- replicated parameters: identical on every TP rank.

:func:`load_full_state_dict` cuts a full state dict into this rank's pieces;
:func:`gather_full_state_dict` (collective over the TP group) rebuilds the full tensors, of the
parameters or of their gradients. Used by the TP-equivalence tests and the portable export.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dchag.layers.channel_plan import group_layout


def _tp_info():
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def local_piece(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` for the parameter ``param``."""
    tp, rank, _ = _tp_info()
    layout = group_layout(param)
    if layout is not None and not layout.is_complete:
        return layout.local_from_full(full)
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        return torch.chunk(full, tp, dim=param.partition_dim)[rank]
    return full


def load_full_state_dict(model: torch.nn.Module, full: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy this rank's pieces of the full tensors into the model's parameters (and buffers)."""
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in full]
    unexpected = [k for k in full if k not in params and k not in dict(model.named_buffers())]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if name not in full:
                continue
            piece = local_piece(p, full[name])
            if piece.shape != p.shape:
                raise ValueError(f"'{name}': piece {tuple(piece.shape)} does not fit parameter {tuple(p.shape)}")
            p.copy_(piece)


def _gather_full(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    tp, _, group = _tp_info()
    layout = group_layout(param)
    if tp == 1:
        return local.detach().clone()
    if layout is not None and not layout.is_complete:
        pieces = [None] * tp
        dist.all_gather_object(pieces, (layout.owned, local.detach().cpu()), group=group)
        blocks = {}
        for owned, tensor in pieces:
            for g, block in zip(owned, torch.split(tensor, [layout.block_sizes[g] for g in owned], dim=layout.axis)):
                blocks[g] = block
        return torch.cat([blocks[g] for g in range(len(layout.block_sizes))], dim=layout.axis)
    if getattr(param, "tensor_model_parallel", False):
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.detach().contiguous(), group=group)
        return torch.cat(parts, dim=param.partition_dim)
    return local.detach().clone()


def named_full_tensors(model: torch.nn.Module, grads: bool = False) -> Iterable[Tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        local = p.grad if grads else p.data
        if grads and local is None:
            local = getattr(p, "main_grad", None)
        if local is None:
            local = torch.zeros_like(p)
        yield name, _gather_full(p, local)


def gather_full_state_dict(model: torch.nn.Module, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Full tensors of all parameters (or of their gradients); collective over the TP group."""
    return dict(named_full_tensors(model, grads))
