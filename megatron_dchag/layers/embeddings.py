"""Fixed sin-cos tables: 1-D (channel index, wavelength, lead time) and 2-D (patch position)."""

from __future__ import annotations

import math

import torch


def sincos_1d(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[n] -> [n, dim]`` table: first half sines, second half cosines (MAE/ClimaX convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64) / half
    omega = 1.0 / (max_period**omega)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(torch.float32)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """``[grid_h * grid_w, dim]`` table for a row-major patch grid: half the dims encode the row,
    half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)


def interpolate_pos_embedding(table: torch.Tensor, old_grid: tuple, new_grid: tuple) -> torch.Tensor:
    """Bicubic resize of a ``[h*w, D]`` position table to another patch grid."""
    oh, ow = old_grid
    nh, nw = new_grid
    if (oh, ow) == (nh, nw):
        return table
    dim = table.shape[-1]
    grid = table.reshape(1, oh, ow, dim).permute(0, 3, 1, 2).to(torch.float32)
    out = torch.nn.functional.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(nh * nw, dim).to(table.dtype)


def lead_time_features(lead_hours: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos features of the forecast lead time in hours, ``[B] -> [B, dim]``."""
    return sincos_1d(lead_hours.to(torch.float32), dim, max_period=10000.0).to(lead_hours.device)


def xavier_uniform_(tensor: torch.Tensor, fan_in: int, fan_out: int, generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)
