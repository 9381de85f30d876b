"""Rate (prompt, reply) pairs with a reward model (a task=reward run).

    python -m t5x_like.score --workdir=runs/rm --prompt="What is 2 + 3?" --reply=5 --reply=6
    python -m t5x_like.score --workdir=runs/rm --input=pairs.jsonl --output=scored.jsonl

--input is JSON lines {"prompt": str or messages, "reply": str}; each line comes back with a
"score" added (to --output, or stdout). Higher is better; compare replies to the same prompt.
"""

import json
import sys

from absl import flags

from t5x_like.core import cli
from t5x_like.core import files
from t5x_like.evaluation import reward_model
from t5x_like.core.errors import UserError


def _messages(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise UserError(f"{where}: 'prompt' must be a string or a list of messages "
                    "({\"role\", \"content\"}).")


def read_pairs(path: str) -> list[dict]:
    pairs = []
    for n, obj in files.iter_jsonl(path):
        where = f"{path}, line {n}"
        if not isinstance(obj, dict) or not isinstance(obj.get("reply"), str) or (
                "prompt" not in obj):
            raise UserError(f"{where}: needs \"prompt\" and a string \"reply\".")
        pairs.append({**obj, "messages": _messages(obj["prompt"], where)})
    return pairs


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}.")
    f = flags.FLAGS
    if bool(f.input) == bool(f.prompt):
        raise UserError("give either --input=<pairs.jsonl> or --prompt with one or more --reply.")
    if f.input:
        pairs = read_pairs(f.input)
    else:
        if not f.reply:
            raise UserError("--prompt needs at least one --reply to score.")
        pairs = [{"prompt": f.prompt, "reply": r, "messages": _messages(f.prompt, "--prompt")}
                 for r in f.reply]
    rm = reward_model.RewardModel.load(f.workdir, step=f.step)
    scores = rm.score([p["messages"] for p in pairs], [p["reply"] for p in pairs])
    lines = "".join(json.dumps({**{k: v for k, v in p.items() if k != "messages"},
                                "score": round(float(s), 6)}) + "\n"
                    for p, s in zip(pairs, scores))
    if f.output:  # never a half-written file
        files.atomic_write_text(f.output, lines)
    else:
        sys.stdout.write(lines)


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    flags.DEFINE_string("workdir", None, "A reward model's run directory.", required=True)
    flags.DEFINE_string("input", "", "JSON lines {prompt, reply} to score.")
    flags.DEFINE_string("output", "", "Where to write the scored lines (default: stdout).")
    flags.DEFINE_string("prompt", "", "One user message to score replies to.")
    flags.DEFINE_multi_string("reply", [], "A reply to --prompt (repeatable).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    cli.run(main)
