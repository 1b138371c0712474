"""The comparison harness: train a CNN in every number format, structural strategy, batch
size and seed, and report training time against test accuracy (a Pareto front).

Run it as ``python -m dfp.harness`` or ``dfp-compare`` (``dfp.harness.cli.main``). The
modules: ``formats`` (how each format sets up a run), ``strategies`` (PruneTrain,
Net2Net and their combination, on ``dfp.structure``), ``schedule`` (linear learning-rate
scaling, warm-up, cosine decay), ``train`` (one timed run), ``study`` (all runs of a
study, resumable), ``results`` (the JSON Lines store), ``report`` (markdown table and
plots) and ``environment``.
"""
