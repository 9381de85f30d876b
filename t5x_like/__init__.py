"""t5x_like: train, fine-tune, align and serve chat language models in JAX.

The entry points (`python -m t5x_like.<job>`) are the modules at this level: train, evaluate,
sample, chat, serve, export, hf, score, feedback, plan, sweep, lifecycle, eval_trial. The library
behind them is grouped by stage of the lifecycle:

    core/         cli, config defaults and checks, errors, metrics.jsonl, opening a run, files
    modeling/     the transformer, partitioning rules, LoRA, KV-cache decoding, FLOPs
    training/     the loop, tasks (LM, reward, DPO, RL), losses, optimizer, checkpoints
    evaluation/   suites, tasks, text metrics, human review, reward-model scoring, run reports
    serving/      the OpenAI-style server, web page, best-of-N, feedback store
    interop/      Hugging Face import and export
    experiments/  plan, sweeps, the whole lifecycle

Kept import-light (no JAX here) so entry points can set XLA flags before JAX starts.
"""

__version__ = "0.1.0"
