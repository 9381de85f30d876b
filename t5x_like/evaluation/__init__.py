"""Evaluation: suites of tasks on a checkpoint (eval_suite, their defaults in suites, readers in
eval_tasks, scores in eval_metrics, what they write in results), lm-evaluation-harness tasks
(harness), side-by-side human review (human_eval), a trained reward model as a scorer
(reward_model) and comparing runs (report).
"""
