"""Speed benchmarks of syncbn against its peers; run them with ``python -m benchmarks.run``.

Modules: ``plan`` (what is measured in each mode), ``naive_syncbn`` (the reference peer),
``timing`` (interleaved timing, the timing communicator), ``rank_setup`` (communicators and
devices inside a rank), ``layer_bench`` / ``comm_bench`` / ``model_bench`` / ``gpu`` (the
measurements, run on every rank), ``machine`` (the stamp), ``report`` and ``plots`` (output).
"""
