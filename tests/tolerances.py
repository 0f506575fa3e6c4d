"""Float tolerances of the suite, each tied to a dtype and to the magnitude of the values compared.

Two computations of the same function by *different code* (a grouped product against a per-channel
convolution loop, TP ranks summing in another order than one process, SDPA against an explicit
softmax) round differently, and by how much depends on the CPU's kernels (vectorisation width, FMA,
BLAS blocking) and on the torch build. Their agreement is therefore checked against the largest value
compared, never elementwise at about one unit in the last place:

    max |actual - expected| / max |expected|  <=  rel

``rel`` is a few hundred float32 epsilons (``FLOAT32_REL`` = 1e-5 ~ 84 eps): rounding of a sum of a
few hundred terms stays far below it, while any real bug (a wrong channel, patch, weight layout or
shard) changes the result by a sizeable fraction of its magnitude. Exact comparisons
(``torch.equal``, ``rtol=0, atol=0``) remain only where both sides run the same code on the same
machine: resume, resharding, data reads, data movement through collectives.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7
FLOAT64_EPS = torch.finfo(torch.float64).eps  # 2.2e-16
# Different float32 code paths for the same function: ~84 eps of the largest magnitude.
FLOAT32_REL = 1e-5
# Different float64 code paths: ~4,500 eps, still 1e-10 of the largest magnitude.
FLOAT64_REL = 1e-10
# bf16 runs whose reductions round differently (bf16 against fp32 gradient reduction): one bf16 eps.
BFLOAT16_REL = torch.finfo(torch.bfloat16).eps  # 2^-7


def default_rel(dtype: torch.dtype) -> float:
    return FLOAT64_REL if dtype == torch.float64 else FLOAT32_REL


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of ``expected``."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


def assert_close_scaled(actual, expected, rel: float = None, what: str = "values") -> None:
    """``actual`` equals ``expected`` up to ``rel`` of the largest magnitude of ``expected``."""
    expected_t = torch.as_tensor(expected)
    rel = default_rel(expected_t.dtype) if rel is None else rel
    err = max_relative_error(actual, expected_t)
    assert err <= rel, f"{what}: max error {err:.3e} of the largest magnitude > {rel:g}"
