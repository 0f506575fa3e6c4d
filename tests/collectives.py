"""Count the torch.distributed collectives issued inside a block (tests only).

megatron-core binds ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to module-level aliases
at import, so those aliases are patched too.
"""

import contextlib
from collections import Counter

import torch.distributed as dist

GATHER_NAMES = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object")
OTHER_NAMES = ("all_reduce", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "all_to_all_single")


@contextlib.contextmanager
def count_collectives():
    """Yields a Counter keyed 'all_gather' (every gather flavour) and the other collective names."""
    import megatron.core.tensor_parallel.mappings as mappings

    counts: Counter = Counter()
    patched = []

    def wrap(owner, attr, key):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        patched.append((owner, attr, original))

    for name in GATHER_NAMES:
        if hasattr(dist, name):
            wrap(dist, name, "all_gather")
    for name in OTHER_NAMES:
        if hasattr(dist, name):
            wrap(dist, name, name.lstrip("_").replace("_base", "").replace("reduce_scatter_tensor", "reduce_scatter"))
    wrap(mappings, "dist_all_gather_func", "all_gather")
    wrap(mappings, "dist_reduce_scatter_func", "reduce_scatter")
    try:
        yield counts
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
