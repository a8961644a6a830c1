"""``hybrid-compare``: one self-contained HTML dashboard (and PNG figures) comparing the runs of one or
more sweeps, read from the local run records (works offline) or from a W&B project.

The pieces, one job each: ``runs`` (local records and CSV curves into flat ``Run`` rows), ``wandb_source``
(the same rows from the W&B API), ``figures`` (Plotly charts), ``page`` (the HTML page with Plotly
inlined and a self-check), ``bench_panel`` (``--bench``: hybrid-bench reports beside quality), ``browser``
(headless Chromium screenshots), ``cli`` (the command).
"""

from hybrid.compare.runs import CompareError, Run, load_runs

__all__ = ["CompareError", "Run", "load_runs"]
