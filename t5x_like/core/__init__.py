"""What every job shares: the command line and its sub-commands (cli), every config default
(defaults) and their checks (config), errors a user can fix (errors), metrics.jsonl (metrics),
opening a trained run (runs), and the small utilities of every writer: atomic file and folder
writes and JSON-lines reading (files), markdown tables (markdown), saved plots (plots).
"""
