"""Running and reporting: one cell (runner), results and their verdicts, matrices, reports, CI
pipelines, patch validation, the benchmark and the rig check."""
