"""Tools that watch a run and explain it: the over-optimisation monitor, stopping and the best
policy, sample logs, the HTML report and its plots."""
