"""The SLA planner (``planner.py``: sizes worker pools to TTFT and ITL targets) and the
engine calibration it models workers with (``calibration.py``). One planner serves the
simulator (kvgrid.bench.sim) and a live ``kvgrid serve --autoscale``."""
