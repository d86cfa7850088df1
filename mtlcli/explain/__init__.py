"""Reports on a trained run: gate use per task and expert, cross-stitch mixing, task correlation,
gradient conflict on the shared parameters, training history, and side-by-side run comparison.

Pure functions over a model and a split (or a run directory): they return plain data and never print.
"""

from mtlcli.explain.compare import compare_runs
from mtlcli.explain.report import ExplainOptions, explain_model, explain_run

__all__ = ["ExplainOptions", "compare_runs", "explain_model", "explain_run"]
