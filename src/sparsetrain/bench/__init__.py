"""Measurement: ``sparsetrain bench train`` (:mod:`~sparsetrain.bench.train`: a training step,
dense vs sparse vs a plain-loop reference) and ``sparsetrain bench layer``
(:mod:`~sparsetrain.bench.layer`: one block-sparse linear layer against cuBLAS), with their
timing helpers (:mod:`~sparsetrain.bench.timing`) and the reference loop
(:mod:`~sparsetrain.bench.reference_loop`). The scripts in ``benchmarks/`` build on these.
"""
