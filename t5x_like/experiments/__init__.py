"""Experiments around the jobs: sizing a job before running it (plan), sweeps (sweep,
sweep_report) and the whole lifecycle in one command (lifecycle, lifecycle_report).
"""
