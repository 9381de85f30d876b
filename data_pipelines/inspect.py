"""See examples as the model sees them, with the tokens that carry loss marked:
`python -m data_pipelines.inspect --config=configs/sft_chat.py --n=3 [--split=validation]`.

Examples are prepared and encoded exactly as training does (same source, tokenizer, chat
template, loss mask and long-conversation policy). A source that needs preparing is prepared
into data.cache_dir, else `--workdir`'s data/ folder, else a per-user cache
($XDG_CACHE_HOME/t5x_like/inspect, ~/.cache/... by default) where reruns find it: never into
the current folder, which is not this command's to fill. Chats are rendered in the run's chat
template (data.chat_template: the project's or the model's own). Tokens the loss learns from
are green in a terminal and wrapped in [[...]] otherwise; the rest is shown plain. The template's
own marker tokens are cyan in a terminal; the same text typed inside a message (plain text to
the model) is shown escaped, as \\<|end|>, so the two never look alike. Each example ends with
its token count, learned-token count, and whether it is longer than model.max_len (training
would cut it into pieces).
"""

import collections
import os
import re
import sys

from absl import flags

GREEN, CYAN, RESET = "\033[32m", "\033[36m", "\033[0m"


def show(tokenizer, tokens, weights, color: bool, controls: dict[int, str] | None = None) -> str:
    """Runs of tokens with the same weight, decoded; learned runs marked. `controls`
    ({id: text}, chat_template.control_tokens): tokens shown as their text (cyan in color),
    while that text inside decoded text is escaped with a backslash."""
    controls = controls or {}
    literal = re.compile("|".join(map(re.escape, sorted(set(controls.values()), key=len,
                                                         reverse=True))) or "(?!)")

    def spell(run) -> str:
        parts, text = [], []
        for t in [*run, None]:
            if t is None or t in controls:
                if text:
                    parts.append(literal.sub(lambda m: "\\" + m.group(), tokenizer.decode(text)))
                    text = []
                if t is not None:
                    parts.append(f"{CYAN}{controls[t]}{RESET}" if color else controls[t])
            else:
                text.append(t)
        return "".join(parts)

    out, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or bool(weights[i]) != bool(weights[start]):
            text = spell([int(t) for t in tokens[start:i]])
            if weights[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def default_workdir() -> str:
    """A per-user cache folder (prepared sources are keyed by fingerprint, so reruns reuse
    them); the system's temporary folder when there is no writable home."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "t5x_like", "inspect")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"t5x_like-inspect-{os.getuid()}")


def main(argv):
    del argv
    from data_pipelines import chat_template
    from data_pipelines import tokenizer as tokenizer_lib
    from t5x_like.core import config as config_lib
    from t5x_like.training import trainer
    from t5x_like.training.tasks import lm

    f = flags.FLAGS
    cfg = f.config
    config_lib.validate(cfg)
    workdir = os.path.abspath(f.workdir or default_workdir())
    if cfg.init_from:
        from t5x_like.training import checkpoints

        cfg = trainer.inherit_tokenizer(cfg, checkpoints.locate(cfg.init_from)[0])
    prepared = trainer.prepare_data(cfg, workdir)
    tok = tokenizer_lib.Tokenizer(prepared.tokenizer_path)
    template = chat_template.setup(cfg, tok)  # the one training would use
    print(f"chat template: {template.name} ({template.where})")
    controls = chat_template.control_tokens(tok)
    counts = collections.Counter()
    encode = lm.example_encoder(cfg, tok, prepared.text_field, counts)
    split = cfg.data.train_split if f.split == "train" else cfg.data.eval_split
    source = prepared.data_source(split, kind=trainer.TASK_KINDS[cfg.task])
    color = f.color == "always" or (f.color == "auto" and sys.stdout.isatty())
    for i in range(min(f.n, len(source))):
        example = encode(source[i])
        tokens, weights = example["tokens"], example["weights"]
        print(f"--- {split} example {i} ---")
        if len(tokens) == 0:
            print("(dropped: longer than model.max_len under data.on_long=drop/truncate)")
            continue
        print(show(tok, tokens, weights, color, controls))
        longer = len(tokens) - 1 > cfg.model.max_len
        print(f"--- {len(tokens)} tokens, {int(weights.sum())} with loss"
              f"{f', longer than model.max_len={cfg.model.max_len}' if longer else ''} ---")
    if counts:
        print(f"long conversations so far: {dict(counts)}")


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from ml_collections import config_flags

    from t5x_like.core import cli

    config_flags.DEFINE_config_file("config", None, "Job config file (configs/*.py).")
    flags.DEFINE_integer("n", 3, "Examples to print.")
    flags.DEFINE_enum("split", "train", ["train", "validation"], "Which split.")
    flags.DEFINE_string("workdir", "", "Where the source is prepared (its data/ folder), "
                        "unless data.cache_dir is set; default: a per-user cache folder.")
    flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "Green loss tokens.")
    cli.run(main)
