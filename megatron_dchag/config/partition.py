"""How a run's things are split: channels into groups, a group's tokens into the chunks of the
aggregation tree, patch positions into visible and masked ones.

Pure integer arithmetic, shared by the configuration rules, the layers, the FLOP counter and the
memory model, so that all of them split exactly alike.
"""

from __future__ import annotations

import math
from typing import List, Sequence


def split_evenly(total: int, parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous pieces of ``total`` that differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def aggregation_level_sizes(num_tokens: int, tree: Sequence[int]) -> List[List[int]]:
    """Chunk lengths at each level of the partial-aggregation tree for a group of ``num_tokens``.

    Level k splits the current tokens into ``ceil(n / tree[k])`` contiguous chunks whose sizes
    differ by at most one; the last level is one chunk over whatever remains.
    """
    levels = []
    n = num_tokens
    for chunk in tree:
        m = math.ceil(n / chunk)
        levels.append(split_evenly(n, m))
        n = m
    levels.append([n])
    return levels


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """Patch positions the MAE masks: ``round(num_patches * mask_ratio)``, at least one and at most
    ``num_patches - 1`` (the encoder always sees one patch and the decoder predicts one)."""
    return min(max(int(round(num_patches * mask_ratio)), 1), num_patches - 1)
