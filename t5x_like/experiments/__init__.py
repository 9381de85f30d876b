"""Experiments around the jobs: sizing a job before running it (plan), sweeps (sweep, its
config's checks in sweep_config, its results in sweep_report) and the whole lifecycle in one
command (lifecycle, lifecycle_report).
"""
