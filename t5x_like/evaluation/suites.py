"""Every default of an evaluation suite and of its tasks, in one place, and the demo suite.

A suite is `suite()` plus tasks built with `task(kind, source, ...)`; any key can be overridden
on the command line: `--config.tasks.ntrex_en_de.n=20 --config.batch_size=32`. Tasks run in
the order of their names. README.md ("Evaluation") lists the sources. The recipes in
configs/eval/ build on these (configs/eval/common.py); eval_suite.validate checks a suite.
"""

import ml_collections


def suite() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.batch_size = 16  # prompts per decoder batch (generate); sequences per batch (likelihood)
    cfg.seed = 0  # sampling seed of the first example; example i uses seed + i
    cfg.data_dir = "../shared/data/eval"  # folder of the built-in readers' files (NTREX, ...)
    cfg.only = ""  # comma-separated task names to run; "" = all
    cfg.tasks = ml_collections.ConfigDict()
    return cfg


def task(kind: str, source: str, **overrides) -> ml_collections.ConfigDict:
    """kind: "generate" (prompt -> reply, scored against references), "likelihood", or
    "harness:<task>" (an lm-evaluation-harness task; needs the eval extra)."""
    t = ml_collections.ConfigDict()
    t.kind = kind
    # generate:   synthetic:arithmetic | ntrex:en-de | ntrex:en-fr | scitldr | dialogsum
    #             | self_instruct | jsonl:<path> ({"prompt", "references"} per line)
    # likelihood: run (the run's own data.source) | prepared:<dir> | text:<path or glob>
    #             | jsonl:<path>:<field> | chat:<path> ({"messages"} per line)
    #             | synthetic:arithmetic | synthetic:arithmetic_chat
    # harness:    a folder of lm-eval task YAMLs to add to lm-eval's own ("" = none); the
    #             local tasks t5x_demo_arithmetic_mc, t5x_demo_arithmetic_gen and
    #             t5x_shakespeare_ppl are always there (t5x_like/evaluation/harness.py)
    t.source = source
    t.n = 0  # examples (generate) or records (likelihood) from the start; 0 = all
    t.metrics = ""  # comma-separated (bleu, chrf, rouge, exact_match, token_f1, classification,
    #                 ...); "" = the source's own choice
    t.template = "chat"  # chat: the chat template, reply up to <|end|>; plain: text continued
    #                     (harness: chat = lm-eval's apply_chat_template)
    t.system = ""  # a system message put before every chat prompt ("" = none)
    t.max_new_tokens = 64
    t.temperature = 0.0  # 0 = greedy
    t.top_k = 0  # 0 = off
    t.top_p = 1.0  # 1 = off
    t.stop_strings = ()  # plain template: end the reply at these, e.g. ("\n",)
    t.split = "validation"  # likelihood on run / prepared: which split
    t.loss_on = "assistant"  # likelihood on chat records: assistant | last_assistant | all
    # likelihood: tokens per scored window (longer records are cut into windows); 0 = the run's
    # model.max_len. Fix it to compare runs trained at different lengths on the same windows.
    t.max_len = 0
    t.num_fewshot = -1  # harness: few-shot examples in each prompt; -1 = the task's own
    t.update(overrides)
    return t


def demo() -> ml_collections.ConfigDict:
    """The embedded demo task's suite (configs/eval/demo.py; evaluate.demo_accuracy)."""
    cfg = suite()
    cfg.tasks.arithmetic = task("generate", "synthetic:arithmetic", n=200,
                                max_new_tokens=8, stop_strings=("\n",))
    cfg.tasks.arithmetic_chat = task("likelihood", "synthetic:arithmetic_chat", n=500,
                                     max_len=128)
    return cfg
