"""Chat with a trained run in the terminal: `python -m t5x_like.chat --workdir=runs/sft`.

    python -m t5x_like.chat --workdir=runs/sft --temperature=0.7 --top_p=0.9 --system="Be brief."

Keeps the conversation and renders it with the one chat template (data_pipelines/
chat_template.py) before every reply, which streams token by token from the KV-cache decoder.
Commands: `/reset` forgets the conversation (the system prompt stays), `/system <text>` sets
the system prompt (`/system` alone clears it), `/help`, `/quit` (or Ctrl-D). When the
conversation outgrows the model's context, the oldest exchanges are dropped, with a note.
"""

import dataclasses
import sys
from typing import Callable, Iterable

from data_pipelines import chat_template
from t5x_like.modeling import decoding

HELP = ("commands: /reset (forget the conversation), /system <text> (set the system prompt; "
        "/system alone clears it), /help, /quit")


@dataclasses.dataclass
class Session:
    decoder: decoding.Decoder
    tokenizer: object
    sampling: decoding.Sampling
    system: str = ""
    messages: list = dataclasses.field(default_factory=list)  # user/assistant turns
    replies: int = 0  # seeds the next reply, so two replies never share one

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages


def _fit(session: Session, write: Callable[[str], None]) -> list[int] | None:
    """The prompt ids, dropping the oldest exchanges until prompt + reply fit the context."""
    room = session.decoder.max_len - session.sampling.max_new_tokens
    while True:
        prompt = chat_template.prompt(session.tokenizer, session.conversation())
        if len(prompt) <= room:
            return prompt
        if len(session.messages) <= 1:
            write(f"(that message is {len(prompt)} tokens with the system prompt; the context "
                  f"leaves {room} for it: shorten it or lower --max_new_tokens)\n")
            session.messages.clear()
            return None
        del session.messages[:2]  # the oldest user turn and its reply
        write("(dropped the oldest exchange to fit the context)\n")


def reply(session: Session, text: str, write: Callable[[str], None]) -> str | None:
    """Adds the user's `text`, streams the reply through `write`, and keeps it."""
    session.messages.append({"role": "user", "content": text})
    prompt = _fit(session, write)
    if prompt is None:
        return None
    sampling = dataclasses.replace(
        session.sampling, seed=session.sampling.seed + session.replies,
        stop_tokens=chat_template.reply_stop_ids(session.tokenizer))
    session.replies += 1
    shown = ""
    completion = None
    for [completion] in session.decoder.stream([prompt], [sampling]):
        if completion.text.startswith(shown) and len(completion.text) > len(shown):
            write(completion.text[len(shown):])
            shown = completion.text
    final = completion.text
    if final.startswith(shown) and len(final) > len(shown):
        write(final[len(shown):])
    write("\n")
    session.messages.append({"role": "assistant", "content": final})
    return final


def handle(session: Session, line: str, write: Callable[[str], None]) -> bool:
    """One line typed by the user; False when the chat should end."""
    line = line.rstrip("\n")
    command, _, rest = line.strip().partition(" ")
    if command in ("/quit", "/exit"):
        return False
    if command == "/reset":
        session.messages.clear()
        write("(conversation reset)\n")
    elif command == "/system":
        session.system = rest.strip()
        write(f"(system prompt: {session.system!r})\n" if session.system
              else "(system prompt cleared)\n")
    elif command == "/help":
        write(HELP + "\n")
    elif command.startswith("/"):
        write(f"(unknown command {command}; {HELP})\n")
    elif line.strip():
        write("assistant> ")
        reply(session, line, write)
    return True


def run(session: Session, lines: Iterable[str], write: Callable[[str], None]) -> None:
    for line in lines:
        if not handle(session, line, write):
            break


def _typed_lines(prompt: str) -> Iterable[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def main(argv):
    from absl import flags

    from t5x_like.core import runs
    from t5x_like.core.errors import UserError

    from t5x_like.core import cli

    del argv
    f = flags.FLAGS
    cli.check_sampling_flags(temperature=f.temperature, top_p=f.top_p, top_k=f.top_k,
                             max_new_tokens=f.max_new_tokens)
    run_ = runs.load(f.workdir, step=f.step)
    decoder = decoding.Decoder.from_run(run_, max_batch=1)
    if f.max_new_tokens >= decoder.max_len:
        raise UserError(f"--max_new_tokens={f.max_new_tokens} leaves no room for the "
                        f"conversation in the model's context of {decoder.max_len} tokens.")
    sampling = decoding.Sampling(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                                 top_k=f.top_k, top_p=f.top_p, seed=f.seed)
    session = Session(decoder, run_.tokenizer, sampling, system=f.system)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    print(f"chatting with {f.workdir} (step {run_.step}); {HELP}")
    run(session, _typed_lines("you> "), write)


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from absl import flags

    from t5x_like.core import cli

    flags.DEFINE_string("workdir", None, "Run or model directory to chat with.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    cli.define_sampling_flags(max_new_tokens=128, temperature=0.7,
                              max_new_tokens_help="Longest reply, in tokens.",
                              seed_help="Sampling seed of the first reply (then +1 per reply).")
    flags.DEFINE_string("system", "", "System prompt to start with.")
    cli.run(main)
