"""Tokenizer and linear partial-aggregation tree as one product per channel group.

With a linear tree the channel stage is linear in the patches up to the group tokens::

    out_g = sum_{c in g} w_c (P_c W_c + b_c + e_c)
          = [P_c]_{c in g} [w_c W_c]_{c in g}  +  sum_{c in g} w_c (b_c + e_c)

with ``P_c`` the channel's patches ``[L*B, p*p]``, ``W_c`` its patch embedding ``[p*p, D]``, ``b_c``
its bias, ``e_c`` its channel embedding and ``w_c`` the product of the tree's weights on the path
from ``c`` to the group token (:meth:`PartialChannelAggregation.path_weights`). A group token is
therefore one matrix product ``[L*B, |g| p^2] x [|g| p^2, D]`` with the weights ``w_c W_c`` formed
on the fly, plus a bias; the per-channel tokens ``[C, L, B, D]`` (and their gradient) that the
reference path builds only to sum them with one scalar each are never materialised.

:class:`GroupedPatchEmbeddingSum` evaluates the product in blocks of a few channels: each block's
patches ``[L*B, n p^2]`` are cut from the images, its scaled weights ``[n p^2, D]`` formed, and the
block product accumulated into the group token. Backward repeats the cut and computes, per block,
one product ``[D, L*B] x [L*B, n p^2]``: the gradient ``G_c`` of the scaled weights, from which
``dW_c = w_c G_c`` and ``dw_c = <W_c, G_c>`` (plus the bias term, by autograd). Saved for backward:
the images (the caller's tensor, no copy), the patch-embedding weight and ``w``. Everything else
lives for one block (buffers allocated once per call and reused), so the stage's memory is the
input, the parameters, their gradients, the group tokens and one block's buffers. The FLOPs are
the tokenizer's (forward and weight gradient) plus the elementwise weight formation.

Only linear trees fold this way: a cross-attention level (or the final cross-attention, which
consumes the group tokens) is a softmax over its input tokens, so those tokens must exist.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_dchag.config import split_evenly

# Contraction length (channels x p^2) of one block product: long enough for an efficient GEMM,
# short enough that a block's patches and weights are small next to the group tokens.
BLOCK_CONTRACTION = 2048

ChannelBlock = Tuple[int, int, int]  # (local group, first channel, end channel)


def channel_blocks(group_sizes: Sequence[int], patch_elements: int,
                   block_contraction: Optional[int] = None) -> List[ChannelBlock]:
    """Contiguous channel blocks of each owned group (``group_sizes`` in local order), each block
    of about ``block_contraction`` (default :data:`BLOCK_CONTRACTION`) ``/ patch_elements``
    channels; blocks never span two groups."""
    block_contraction = BLOCK_CONTRACTION if block_contraction is None else block_contraction
    per_block = max(1, block_contraction // patch_elements)
    blocks, start = [], 0
    for g, size in enumerate(group_sizes):
        for n in split_evenly(size, math.ceil(size / per_block)):
            blocks.append((g, start, start + n))
            start += n
    return blocks


def _patch_view(images: torch.Tensor, start: int, stop: int, p: int, sample_first: bool) -> torch.Tensor:
    """Channels ``[start, stop)`` of ``images [B, C, H, W]`` as a view ``[B, Lh, Lw, n, p, p]``
    (``sample_first``) or ``[n, p, p, B, Lh, Lw]``."""
    x = images[:, start:stop].unflatten(2, (images.shape[2] // p, p)).unflatten(4, (images.shape[3] // p, p))
    return x.permute(0, 2, 4, 1, 3, 5) if sample_first else x.permute(1, 3, 5, 0, 2, 4)  # from [B, n, Lh, p, Lw, p]


def _block_patches(images, start, stop, p, where, workspace) -> torch.Tensor:
    """The patch matrix ``[B*L, n*p*p]`` of channels ``[start, stop)`` (rows ``(b, l)``, columns
    ``(c, i, j)``; only the visible positions when ``where`` is given), stored in ``workspace``.

    All patches are copied channel-major (a transposed view is returned: the copy then runs along
    the image rows, which is faster), visible ones gathered sample-major."""
    cols = (stop - start) * p * p
    if where is None:
        x = _patch_view(images, start, stop, p, sample_first=False)
        out = workspace[: x.numel()].view(x.shape)
        out.copy_(x)
        return out.view(cols, -1).t()
    x = _patch_view(images, start, stop, p, sample_first=True)
    out = workspace[: where[1].numel() * cols].view(*where[1].shape, *x.shape[3:])
    torch.ops.aten.index.Tensor_out(x, list(where), out=out)
    return out.view(-1, cols)


def _scatter_block_patches(grad_images, start, stop, p, where, values) -> None:
    """Inverse of :func:`_block_patches`: write ``values [B*L, n*p*p]`` into ``grad_images``."""
    x = _patch_view(grad_images, start, stop, p, sample_first=True)
    if where is None:
        x.copy_(values.view(x.shape))
    else:
        x[where] = values.view(*where[1].shape, *x.shape[3:])


def _visible_positions(patch_index: Optional[torch.Tensor], grid_w: int):
    """Index tensors ``(sample [B, 1], row [B, Lv], col [B, Lv])`` of the visible patches; ``None``: all."""
    if patch_index is None:
        return None
    sample = torch.arange(patch_index.shape[0], device=patch_index.device).view(-1, 1)
    return sample, patch_index // grid_w, patch_index % grid_w


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class GroupedPatchEmbeddingSum(torch.autograd.Function):
    """``out[g] = sum_{c in g} w_c (P_c W_c) + group_bias[g]`` without per-channel tokens.

    Inputs: ``images [B, C, H, W]``, ``weight [C, D, p, p]`` (the tokenizer's layout), ``w [C]``,
    ``group_bias [G, D]``, the channel blocks, ``p`` and an optional ``patch_index [B, Lv]``.
    Output ``[G, L, B, D]`` (``L`` = visible patches). See the module docstring. Block-sized
    buffers are allocated once per call and reused by every block.
    """

    @staticmethod
    def forward(ctx, images, weight, w, group_bias, blocks, patch_size, patch_index):
        with torch.autocast(device_type=images.device.type, enabled=False):
            return GroupedPatchEmbeddingSum._forward(ctx, images, weight, w, group_bias, blocks, patch_size,
                                                     patch_index)

    @staticmethod
    def _forward(ctx, images, weight, w, group_bias, blocks, p, patch_index):
        b, _, h, wd = images.shape
        if h % p or wd % p:
            raise ValueError(f"image {h}x{wd} is not divisible by patch_size={p}")
        dtype, d, k = images.dtype, weight.shape[1], p * p
        acc = _accumulation_dtype(dtype)
        where = _visible_positions(patch_index, wd // p)
        positions = (h // p) * (wd // p) if where is None else patch_index.shape[1]
        weight_c, w_c = weight.to(dtype), w.to(dtype)
        widest = max(stop - start for _, start, stop in blocks)
        patch_space = images.new_empty(widest * k * b * positions)
        scaled_space = images.new_empty(widest * k * d)
        partial = images.new_empty(b * positions, d) if acc != dtype else None
        out = group_bias.to(acc).unsqueeze(1).repeat(1, b * positions, 1)  # [G, B*L, D]
        for g, start, stop in blocks:
            n = stop - start
            patches = _block_patches(images, start, stop, p, where, patch_space)  # [B*L, n k]
            scaled = scaled_space[: n * k * d].view(n, k, d)
            torch.mul(weight_c[start:stop].reshape(n, d, k).transpose(1, 2), w_c[start:stop].view(n, 1, 1), out=scaled)
            if partial is None:  # out= rather than addmm_: torch's FLOP counter sees aten.addmm
                torch.addmm(out[g], patches, scaled.view(n * k, d), out=out[g])
            else:
                out[g].add_(torch.mm(patches, scaled.view(n * k, d), out=partial))
        ctx.blocks, ctx.patch_size = list(blocks), p
        ctx.w_dtype, ctx.bias_dtype = w.dtype, group_bias.dtype
        ctx.save_for_backward(images, weight, w, patch_index)
        return out.to(dtype).view(-1, b, positions, d).transpose(1, 2).contiguous()  # [G, L, B, D]

    @staticmethod
    def backward(ctx, grad_out):
        images, weight, w, patch_index = ctx.saved_tensors
        need_images, need_weight, need_w, need_bias = ctx.needs_input_grad[:4]
        p, dtype = ctx.patch_size, images.dtype
        acc = _accumulation_dtype(dtype)
        d, k = weight.shape[1], p * p
        where = _visible_positions(patch_index, images.shape[3] // p)
        go = grad_out.to(dtype).transpose(1, 2).reshape(grad_out.shape[0], -1, d)  # [G, B*L, D]
        bl = go.shape[1]
        weight_c, w_c = weight.to(dtype), w.to(dtype)
        widest = max(stop - start for _, start, stop in ctx.blocks)
        grad_images = torch.zeros_like(images) if need_images else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_w = torch.empty(w.shape[0], dtype=acc, device=w.device) if need_w else None
        grad_bias = go.to(acc).sum(1).to(ctx.bias_dtype) if need_bias else None
        if need_weight or need_w:
            patch_space = images.new_empty(widest * k * bl)
            gemm_space = images.new_empty(widest * d * k)
            product_space = torch.empty(widest * d * k, dtype=acc, device=images.device) if need_w else None
        for g, start, stop in ctx.blocks:
            n = stop - start
            if need_weight or need_w:
                patches = _block_patches(images, start, stop, p, where, patch_space)
                # Gradient of the scaled weights w_c W_c: one product [D, B*L] x [B*L, n k], viewed
                # in the weight's layout [n, D, k].
                grad_scaled = torch.mm(go[g].t(), patches, out=gemm_space[: n * d * k].view(d, n * k))
                grad_scaled = grad_scaled.view(d, n, k).transpose(0, 1)
                if need_w:  # dw_c = <W_c, G_c>
                    product = product_space[: n * d * k].view(n, d, k)
                    torch.mul(grad_scaled, weight_c[start:stop].reshape(n, d, k), out=product)
                    grad_w[start:stop] = product.sum((1, 2))
                if need_weight:  # dW_c = w_c G_c
                    torch.mul(grad_scaled, w_c[start:stop].view(n, 1, 1), out=grad_weight[start:stop].view(n, d, k))
            if need_images:
                scaled = weight_c[start:stop].reshape(n, d, k) * w_c[start:stop].view(n, 1, 1)  # [n, D, k]
                grad_patches = torch.mm(go[g], scaled.transpose(0, 1).reshape(d, n * k))  # [B*L, n k]
                _scatter_block_patches(grad_images, start, stop, p, where, grad_patches)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.w_dtype)
        return grad_images, grad_weight, grad_w, grad_bias, None, None, None


def fused_group_tokens(tokenizer, channel_embedding, tree, images: torch.Tensor,
                       patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The group tokens ``[G_own, L, B, D]`` of ``tree(tokenizer(images, patch_index, channel_embedding()))``
    for a linear ``tree`` (:class:`~megatron_dchag.layers.aggregation.PartialChannelAggregation`),
    computed by :class:`GroupedPatchEmbeddingSum` with the same parameters."""
    tokenizer.check_images(images)
    w, group_of_channel = tree.path_weights()  # [C_own]
    bias = tokenizer.bias + channel_embedding()  # [C_own, D]
    sizes = tokenizer.plan.owned_group_sizes(tokenizer.sharded)
    group_bias = bias.new_zeros(len(sizes), bias.shape[1]).index_add(0, group_of_channel, w.unsqueeze(1) * bias)
    blocks = channel_blocks(sizes, tokenizer.patch_size**2)
    return GroupedPatchEmbeddingSum.apply(images, tokenizer.weight, w, group_bias, blocks, tokenizer.patch_size,
                                          patch_index)
