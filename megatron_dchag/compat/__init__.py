"""Compatibility with the torch and megatron-core this project runs on.

The rule: no other module of the project patches torch or megatron-core; every work-around for
their behaviour lives here, with the versions or machines it is for and a test that says when
it is no longer needed.

* :mod:`megatron_dchag.compat.cpu`: the CPU layer that lets megatron-core run without a GPU
  (gloo), installed by ``initialize_distributed`` on machines without one.
* :mod:`megatron_dchag.compat.megatron`: megatron-core version checks and the work-arounds for
  its internals, each limited to the releases that need it.
"""
