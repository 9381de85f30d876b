"""The embedded demo task: held-out arithmetic questions answered by a chat model.

    python -m t5x_like.evaluate --workdir=runs/sft --config=configs/eval/demo.py

arithmetic: 200 held-out questions (synthetic.answer_pair's prompts, the ones preference tuning
sees) through the chat template, greedy, exact match by synthetic.check_answer (the reply's
first integer is the answer); evaluate.demo_accuracy runs this task from Python.
arithmetic_chat: loss, perplexity, bits per byte and token accuracy on held-out dialogues,
assistant tokens only, in windows of 128 tokens whatever length the run trained at (DPO's
is 96), so every stage's numbers are over the same whole dialogues.
A pretrained (not chat) model answers the same questions as text continuation with
`--config.tasks.arithmetic.template=plain`.
"""

from t5x_like.evaluation import suites


def get_config():
    return suites.demo()
