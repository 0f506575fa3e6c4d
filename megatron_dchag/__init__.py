"""megatron_dchag: D-CHAG (Distributed Cross-Channel Hierarchical Aggregation) on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import, once per module and per rank, that Apex / Transformer Engine are
# absent. They are optional accelerators here (the local path is complete without them, and the
# resolved config names the transformer implementation in use), so the warning is only noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
