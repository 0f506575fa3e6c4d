"""Per-channel patch tokenization of the channels a rank owns, plus their channel embedding.

Every channel has its own patch embedding (a ``p x p`` conv from 1 channel to ``D``). All owned
channels are computed in **one** batched matrix multiply over the channel axis (mathematically a
grouped convolution with ``groups = C_local``), never a Python loop over channels. The result is
laid out channel-first, ``[C_local, L, B, D]``, so that the channel/group axis can be gathered
along dim 0 and the patch axis matches megatron's sequence-first convention.

When a patch index is given (masked autoencoders), only those patch positions are tokenized.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from megatron_dchag.layers.channel_plan import ChannelGroupPlan, group_generator, mark_group_sharded
from megatron_dchag.layers.embeddings import sincos_1d, xavier_uniform_
from megatron_dchag.layers.sharded_state import GroupShardedStateMixin


def patchify_channels_first(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [C, L, B, p*p]`` with L row-major over the patch grid."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch_size={p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(1, 2, 4, 0, 3, 5).reshape(c, (h // p) * (w // p), b, p * p)


def select_patches(patches: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
    """Keep patch positions ``patch_index`` ``[B, Lv]`` of ``[C, L, B, k]`` -> ``[C, Lv, B, k]``."""
    c, _, b, k = patches.shape
    idx = patch_index.t().reshape(1, -1, b, 1).expand(c, -1, b, k)
    return torch.gather(patches, 1, idx)


class GroupedPatchTokenizer(GroupShardedStateMixin, nn.Module):
    """Patch embeddings of the owned channels: ``weight [C_own, D, p, p]``, ``bias [C_own, D]``.

    Parameters are initialised group by group from :func:`group_generator`, so channel ``c`` gets
    the same initial weights whatever the TP size or strategy.
    """

    def __init__(self, plan: ChannelGroupPlan, sharded: bool, patch_size: int, hidden_size: int, seed: int):
        super().__init__()
        self.plan, self.sharded = plan, sharded
        self.patch_size, self.hidden_size = patch_size, hidden_size
        groups = list(plan.owned_groups(sharded))
        sizes = plan.owned_group_sizes(sharded)
        self.num_local_channels = sum(sizes)
        k = patch_size * patch_size
        self.weight = nn.Parameter(torch.empty(self.num_local_channels, hidden_size, patch_size, patch_size))
        self.bias = nn.Parameter(torch.zeros(self.num_local_channels, hidden_size))
        with torch.no_grad():
            for g, piece in zip(groups, torch.split(self.weight, sizes, dim=0)):
                xavier_uniform_(piece, k, hidden_size, group_generator(seed, "tokenizer.weight", g))
        for p in (self.weight, self.bias):
            mark_group_sharded(p, 0, plan.group_sizes, groups)

    def check_images(self, images: torch.Tensor) -> None:
        """``images`` must be ``[B, C_own, H, W]``: this rank's channels."""
        if images.dim() != 4 or images.shape[1] != self.num_local_channels:
            raise ValueError(
                f"tokenizer expects images [B, {self.num_local_channels}, H, W] (this rank's channels), "
                f"got {tuple(images.shape)}"
            )

    def forward(
        self,
        images: torch.Tensor,
        patch_index: Optional[torch.Tensor] = None,
        channel_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``images [B, C_own, H, W]`` -> tokens ``[C_own, L, B, D]`` (``L`` = visible patches)."""
        self.check_images(images)
        patches = patchify_channels_first(images, self.patch_size)
        if patch_index is not None:
            patches = select_patches(patches, patch_index)
        c, l, b, k = patches.shape
        bias = self.bias if channel_bias is None else self.bias + channel_bias
        weight = self.weight.reshape(c, self.hidden_size, k).transpose(1, 2)  # [C, k, D]
        tokens = torch.baddbmm(bias.unsqueeze(1).to(patches.dtype), patches.reshape(c, l * b, k), weight.to(patches.dtype))
        return tokens.view(c, l, b, self.hidden_size)


class ChannelEmbedding(GroupShardedStateMixin, nn.Module):
    """Learned per-channel embedding ``[C_own, D]``, initialised as a sin-cos table of the channel
    index or of the channel's wavelength (nm)."""

    def __init__(
        self,
        plan: ChannelGroupPlan,
        sharded: bool,
        hidden_size: int,
        wavelengths: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        start, stop = plan.owned_channel_range(sharded)
        if wavelengths is not None:
            if len(wavelengths) != plan.num_channels:
                raise ValueError(f"got {len(wavelengths)} wavelengths for {plan.num_channels} channels")
            positions = torch.tensor(list(wavelengths), dtype=torch.float64)[start:stop]
        else:
            positions = torch.arange(start, stop, dtype=torch.float64)
        self.weight = nn.Parameter(sincos_1d(positions, hidden_size))
        mark_group_sharded(self.weight, 0, plan.group_sizes, list(plan.owned_groups(sharded)))

    def forward(self) -> torch.Tensor:
        return self.weight
