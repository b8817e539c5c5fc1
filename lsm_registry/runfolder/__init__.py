"""A run folder, from writing it to reading it: the reporter a run writes through (progress, files,
trackers), the loggers, reading and grouping finished runs (compare, sweep), the HTML page
(``lsm report``), scoring a finished run again (``lsm evaluate``, ``lsm tau-norm``) and exporting
its model (``lsm export``)."""
