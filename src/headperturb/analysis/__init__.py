"""The analysis side (numpy and pandas, no torch): scoring, statistics, discrimination and bias,
the run's table, the screen's estimates, figures and the summary."""
