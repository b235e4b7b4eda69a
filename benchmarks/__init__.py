"""Benchmarks of syncbn against its peers: ``python -m benchmarks.run`` (speed; ``--only
overhead`` / ``--only compile`` for one section), ``python -m benchmarks.accuracy`` (the
statistical payoff), ``python -m benchmarks.scaling`` (a model of communication at scale).

Modules: ``plan`` (what is measured in each mode), ``naive_syncbn`` (the reference peer),
``timing`` (interleaved timing, the timing communicator), ``rank_setup`` (communicators and
devices inside a rank), ``layer_bench`` / ``comm_bench`` / ``model_bench`` / ``gpu`` (the
measurements, run on every rank), ``machine`` (the stamp), ``report`` and ``plots`` (output),
``figure_style`` (the palette and footer every figure shares), ``targets`` (the goals checked).
"""
