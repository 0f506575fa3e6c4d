"""Time limits of the suite's subprocess runs: they catch a hang, never mere slowness.

On an idle 2-core machine the slowest single run (one entry-point or conversion launch, or one
``run_distributed`` call) takes about 40 s; on a machine at load 10-20 the whole suite runs 3-5x
slower. Each limit is therefore at least 20x the idle time of what it bounds, so a loaded machine
cannot fail a correct run, while a real hang is still reported with its stack.
"""

# One distributed run, entry-point launch or conversion (idle: up to ~40 s).
RUN_TIMEOUT_S = 900
# Waiting for a running job to reach a step before it is signalled (idle: a few seconds).
STEP_WAIT_S = 600
# A short command: a launcher probe, an import check, a --help (idle: under 10 s).
SHORT_TIMEOUT_S = 300
