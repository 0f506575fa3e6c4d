"""Training on megatron-core: the builder, the loop, checkpoints and their conversion, logging, and
the entry point that the ``pretrain_*`` scripts share (docs/architecture.md)."""
