"""Pictures: mixed batches drawn with PIL (``lsm preview``, mixed_samples.png) and the matplotlib
plots of the optional ``plot`` extra (per-class accuracy, confusion, learning curves)."""
