"""Efficiency suite (``hybrid-bench``): training throughput, prefill and decode cost per pattern.

The comparison of architectures is only fair when every pattern is measured by the same code at the
same width, depth, dtype and lengths; this package is that code. ``run.run_bench`` returns one JSON
report; ``cli`` is the Hydra entry point; ``plot`` draws prefill time and decode latency vs length.
"""
