"""What every job shares: the command line (cli), configs (config), errors a user can fix
(errors), metrics.jsonl (metrics) and opening a trained run (runs).
"""
