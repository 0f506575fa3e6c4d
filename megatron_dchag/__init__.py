"""megatron_dchag: D-CHAG (Distributed Cross-Channel Hierarchical Aggregation) on megatron-core."""

__version__ = "0.1.0"
