"""Evaluate a run, review two models side by side, compare runs.

    python -m t5x_like.evaluate --workdir=runs/x --config=configs/eval/demo.py [--checkpoint=best]
        runs the suite's tasks on one checkpoint (latest, best, or a step number) and writes
        runs/x/eval/<step>/results.json, results.md (printed), <task>.jsonl predictions, and
        one line per task in runs/x/metrics.jsonl (split "eval/<task>"); see eval_suite.py
    python -m t5x_like.evaluate compare runs/a runs/b --prompts=prompts.jsonl [--out=DIR]
        generates both models' replies and writes a blinded side-by-side sheet; see human_eval.py
    python -m t5x_like.evaluate ratings DIR --ratings=sheet.csv[,more.json]
        reads filled-in ratings back: preference pairs and A's win rate with a 95% interval
    python -m t5x_like.evaluate report runs/a runs/b ... [--out=report]
        tables and learning curves of several runs from their metrics.jsonl; see report.py
    python -m t5x_like.evaluate harness --workdir=runs/x --tasks=arc_easy,hellaswag
            [--limit=N] [--num_fewshot=K] [--checkpoint=best] [--template=chat|plain]
        lm-evaluation-harness tasks (the eval extra): lm-eval's results JSON in
        runs/x/eval/<step>/harness/, rows in results.json / results.md and metrics.jsonl lines
        (split "eval/harness:<task>"); local tasks need no network; see harness.py

"best" is the checkpoint with the best validation metric in metrics.jsonl among the steps that
still have a checkpoint: the run's checkpoint.keep_best_by and best_mode, else its
eval.early_stop_by and early_stop_mode, else the lowest loss.

From Python (the SFT, preference tuning and lifecycle scripts report this number):

    evaluate.demo_accuracy("runs/sft", n=200)
        -> {"exact_match": 0.87, "correct": 174, "n": 200, "step": 600, "seconds": 9.1, ...}
"""

import os

from absl import flags, logging

from t5x_like.training import checkpoints
from t5x_like.core import cli
from t5x_like.modeling import decoding
from t5x_like.evaluation import eval_suite
from t5x_like.evaluation import eval_tasks
from t5x_like.evaluation import human_eval
from t5x_like.evaluation import report as report_lib
from t5x_like.evaluation import results as results_lib
from t5x_like.evaluation import suites
from t5x_like.core import runs
from t5x_like.core.config import load_json
from t5x_like.core.errors import UserError
from t5x_like.core.metrics import read_metrics


def available_steps(workdir: str) -> list[int]:
    directory = checkpoints.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} has no checkpoints/ folder; train first or check the path.")
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def checkpoint_step(workdir: str, which: str = "latest") -> int:
    """--checkpoint=latest | best | <step> -> the step of a checkpoint that exists."""
    steps = available_steps(workdir)
    if not steps:
        raise UserError(f"{checkpoints.checkpoint_dir(workdir)} holds no finished checkpoint.")
    which = (which or "latest").strip()
    if which == "latest":
        return steps[-1]
    if which.isdigit():
        if int(which) not in steps:
            raise UserError(f"--checkpoint={which}: {workdir} has no checkpoint for step "
                            f"{which} (it has {', '.join(map(str, steps))}).")
        return int(which)
    if which != "best":
        raise UserError(f"--checkpoint={which}: use latest, best or a step number.")
    metric, mode = best_metric(load_json(os.path.join(workdir, "config.json")))
    values = {}  # the last line per step wins (an evaluation may have been repeated)
    for r in read_metrics(workdir):
        if r.get("split") == "validation" and isinstance(r.get(metric), (int, float)):
            values[r["step"]] = r[metric]
    ranked = [s for s in steps if s in values]
    if not ranked:
        raise UserError(f"--checkpoint=best: {workdir} has no validation {metric} at any of its "
                        f"checkpoint steps ({', '.join(map(str, steps))}); use latest or a step.")
    pick = min if mode == "min" else max
    return pick(ranked, key=lambda s: (values[s], -s))


def best_metric(cfg) -> tuple[str, str]:
    """(validation metric, "min" | "max") that ranks a run's checkpoints for --checkpoint=best:
    what the run kept its best checkpoints by, else what it stopped early on, else loss."""
    ckpt, ev = cfg.get("checkpoint", {}), cfg.get("eval", {})
    if ckpt.get("keep_best_by"):
        return ckpt["keep_best_by"], ckpt.get("best_mode", "min")
    if ev.get("early_stop_by"):
        return ev["early_stop_by"], ev.get("early_stop_mode", "min")
    return "loss", "min"


def evaluate(workdir: str, suite, checkpoint: str = "latest") -> dict:
    """Runs `suite` on one checkpoint of `workdir`; returns the results (results.json's)."""
    eval_suite.validate(suite)  # a bad suite fails before anything is loaded
    step = checkpoint_step(workdir, checkpoint)
    run = runs.load(workdir, step=step)
    logging.info("Evaluating %s step %d (%s)", workdir, step, checkpoint)
    return eval_suite.run_suite(run, suite, workdir, checkpoint=checkpoint)


def demo_accuracy(run_dir: str, n: int = 200, *, checkpoint: str = "latest",
                  template: str = "chat", batch_size: int = 16) -> dict:
    """Held-out exact-match accuracy of the demo task: `n` held-out arithmetic questions
    (synthetic.answer_pair) answered greedily through the chat template (template="plain" for
    a model that only continues text), each checked by synthetic.check_answer.

    Runs configs/eval/demo.py's "arithmetic" task, so the numbers, eval/<step>/results.json,
    arithmetic.jsonl and the metrics.jsonl line are the command line's. Returns the task's
    result with "exact_match", "correct" and "step" at the top level."""
    suite = suites.demo()  # configs/eval/demo.py's
    suite.only = "arithmetic"
    suite.batch_size = batch_size
    suite.tasks.arithmetic.n = n
    suite.tasks.arithmetic.template = template
    results = evaluate(run_dir, suite, checkpoint)
    task = results["tasks"]["arithmetic"]
    accuracy = task["metrics"]["exact_match"]
    return {**task, "exact_match": accuracy, "correct": round(accuracy * task["n"]),
            "step": results["step"],
            "predictions": os.path.join(run_dir, "eval", str(results["step"]), task["predictions"])}


def compare(a: str, b: str, prompts_path: str, out: str, sampling: decoding.Sampling, *,
            template: str = "chat", batch_size: int = 16, seed: int | None = None) -> dict:
    """Replies of models `a` and `b` to every prompt, written as a blinded sheet in `out`."""
    prompts = human_eval.read_prompts(prompts_path)
    examples = [eval_tasks.Example(str(i), p, "\n".join(m["content"] for m in p), [])
                for i, p in enumerate(prompts)]
    if os.path.exists(out):
        raise UserError(f"{out} already exists; choose a new --out (a sheet is never "
                        "overwritten, so ratings always match their key).")
    replies, labels = [], []
    for path in (a, b):
        directory, step = checkpoints.locate(path)
        run = runs.load(directory, step=step)
        labels.append(f"{directory} step {run.step}")
        completions, truncated = eval_suite.generate(run, examples, sampling, template=template,
                                                     batch_size=batch_size,
                                                     seed=sampling.seed)
        if any(truncated):
            logging.warning("%s: %d prompts were shortened to fit the model's context.", path,
                            sum(truncated))
        replies.append([c.text for c in completions])
        del run
    return human_eval.write_sheet(out, prompts, replies[0], replies[1],
                                  models=(labels[0], labels[1]), seed=seed)


# ---------------------------------------------------------------------------------------------
# The command line: one main and one set of flags per command (cli.run_command).


def main_evaluate(argv):
    del argv
    f = flags.FLAGS
    results = evaluate(f.workdir, f.config, f.checkpoint)
    print(results_lib.markdown(results), end="")
    print(f"written to {os.path.join(f.workdir, 'eval', str(results['step']))}/")


def main_compare(argv):
    f = flags.FLAGS
    a, b = argv[1], argv[2]
    out = f.out or os.path.join("human_eval", f"{os.path.basename(os.path.normpath(a))}-vs-"
                                              f"{os.path.basename(os.path.normpath(b))}")
    cli.check_sampling_flags(temperature=f.temperature, top_p=f.top_p, top_k=f.top_k,
                             max_new_tokens=f.max_new_tokens)
    sampling = decoding.Sampling(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                                 top_k=f.top_k, top_p=f.top_p, seed=f.seed)
    key = compare(a, b, f.prompts, out, sampling, template=f.template,
                  batch_size=f.batch_size, seed=f.shuffle_seed)
    print(f"wrote {out}/sheet.html and {out}/sheet.csv ({len(key['rows'])} rows) for the raters; "
          f"{out}/key.json unblinds them. Then: python -m t5x_like.evaluate ratings {out} "
          "--ratings=<filled sheet.csv or downloaded ratings .json>")


def main_ratings(argv):
    summary = human_eval.score_sheet(argv[1], flags.FLAGS.ratings)
    print(human_eval.describe(summary))
    print(f"wrote {argv[1]}/preferences.jsonl and {argv[1]}/ratings.json")


def main_report(argv):
    text = report_lib.report(argv[1:], flags.FLAGS.out)
    print(text, end="")
    print(f"written to {flags.FLAGS.out}/report.md and {flags.FLAGS.out}/learning_curves.png")


def main_harness(argv):
    del argv
    from t5x_like.evaluation import harness  # local: lm-eval (the eval extra) loads slowly

    f = flags.FLAGS
    step = checkpoint_step(f.workdir, f.checkpoint)
    results = harness.evaluate(f.workdir, step, f.tasks, checkpoint=f.checkpoint, limit=f.limit,
                               num_fewshot=f.num_fewshot, template=f.template, system=f.system,
                               include_path=f.include_path, batch_size=f.batch_size,
                               data_root=f.data)
    print(results_lib.markdown(results), end="")
    print(f"written to {os.path.join(f.workdir, 'eval', str(step))}/")


def _evaluate_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Evaluation suite (configs/eval/*.py).")
    flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
    flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
    flags.DEFINE_alias("step", "checkpoint")  # as sample, chat, serve and export call it


def _compare_flags():
    flags.DEFINE_string("prompts", None, ".jsonl of {\"prompt\": text or messages}, or a "
                        "text file with one prompt per line.")
    flags.DEFINE_string("out", "", "Folder for the sheet (default human_eval/<a>-vs-<b>).")
    cli.define_sampling_flags(max_new_tokens=128, max_new_tokens_help="Tokens per reply.",
                              seed_help="Sampling seed (prompt i uses seed + i).")
    flags.DEFINE_integer("shuffle_seed", None, "Seed of the row order and sides "
                         "(default: random, recorded in key.json).")
    flags.DEFINE_enum("template", "chat", ["chat", "plain"], "Chat template or plain text.")
    flags.DEFINE_integer("batch_size", 16, "Prompts per decoder batch.")


def _ratings_flags():
    flags.DEFINE_list("ratings", None, "Filled sheet.csv and/or downloaded ratings .json "
                      "files (one per rater).")


def _report_flags():
    flags.DEFINE_string("out", "report", "Folder for report.md and learning_curves.png.")


def _harness_flags():
    flags.DEFINE_string("workdir", None, "Run or model directory to evaluate.")
    flags.DEFINE_list("tasks", None, "lm-evaluation-harness tasks, e.g. arc_easy,hellaswag.")
    flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
    flags.DEFINE_float("limit", 0, "Examples per task (0 = all; below 1: a fraction).")
    flags.DEFINE_integer("num_fewshot", -1, "Few-shot examples (-1 = the task's default).")
    flags.DEFINE_enum("template", "auto", ["auto", "chat", "plain"],
                      "auto: chat for SFT, DPO and RL runs, plain otherwise.")
    flags.DEFINE_string("system", "", "A system message before every chat prompt.")
    flags.DEFINE_list("include_path", [], "Folders of task YAMLs besides the local tasks.")
    flags.DEFINE_integer("batch_size", 16, "Sequences per batch.")
    flags.DEFINE_string("data", "../shared/data", "Root of the local tasks' data.")


EVALUATE = cli.Command(main_evaluate, _evaluate_flags, required=("workdir",),
                       usage="--workdir=RUN --config=SUITE [--checkpoint=latest|best|STEP]")
COMMANDS = {
    "compare": cli.Command(main_compare, _compare_flags, args=(2, 2), required=("prompts",),
                           usage="RUN_A RUN_B --prompts=FILE [--out=DIR]"),
    "ratings": cli.Command(main_ratings, _ratings_flags, args=(1, 1), required=("ratings",),
                           usage="DIR --ratings=FILE[,FILE]"),
    "report": cli.Command(main_report, _report_flags, args=(1, None),
                          usage="RUN [RUN ...] [--out=DIR]"),
    "harness": cli.Command(main_harness, _harness_flags, required=("workdir", "tasks"),
                           usage="--workdir=RUN --tasks=TASK[,TASK] [--limit=N] "
                                 "[--num_fewshot=K] [--checkpoint=best] [--template=chat|plain]"),
}


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    cli.run_command("t5x_like.evaluate", COMMANDS, default=EVALUATE)
