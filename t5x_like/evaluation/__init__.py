"""Evaluation: suites of tasks on a checkpoint (eval_suite, eval_tasks, eval_metrics), side-by-side
human review (human_eval), a trained reward model as a scorer (reward_model) and comparing runs
(report).
"""
