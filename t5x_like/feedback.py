"""Export what the chat server collected as training data, after a review if wanted.

    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_sft.jsonl --format=sft
    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_pref.jsonl \
        --format=preference [--reviewed_only]
    python -m t5x_like.feedback review --db=runs/sft/feedback.sqlite --out=review/
    python -m t5x_like.feedback verdicts --db=runs/sft/feedback.sqlite --verdicts=verdicts.json

The entry point only: the job is t5x_like/serving/feedback.py.
"""

from absl import flags

from t5x_like.core import cli
from t5x_like.serving import feedback


def _db_flag():
    flags.DEFINE_string("db", None, f"Feedback database (the server's <workdir>/"
                        f"{feedback.DB_NAME}).")


def _export_flags():
    _db_flag()
    flags.DEFINE_string("out", None, "JSONL file to write.")
    flags.DEFINE_enum("format", "sft", list(feedback.FORMATS),
                      "sft: conversations; preference: (prompt, chosen, rejected) pairs.")
    flags.DEFINE_bool("reviewed_only", False, "Use a correction or report only once a review "
                      "approved it; replies with one not yet reviewed are left out.")


def _review_flags():
    _db_flag()
    flags.DEFINE_string("out", None, "A new folder for sheet.html and sheet.csv.")
    flags.DEFINE_bool("include_reviewed", False, "Also list items that have a verdict.")


def _verdicts_flags():
    _db_flag()
    flags.DEFINE_string("verdicts", None, "The sheet's downloaded verdicts .json or the filled "
                        "sheet.csv.")


# A command more is a main in serving/feedback.py, its flags here, and one entry below.
COMMANDS = {
    "export": cli.Command(feedback.main_export, _export_flags, required=("db", "out"),
                          usage="--db=FILE --out=FILE --format=sft|preference "
                                "[--reviewed_only]"),
    "review": cli.Command(feedback.main_review, _review_flags, required=("db", "out"),
                          usage="--db=FILE --out=DIR [--include_reviewed]"),
    "verdicts": cli.Command(feedback.main_verdicts, _verdicts_flags, required=("db", "verdicts"),
                            usage="--db=FILE --verdicts=FILE"),
}


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    cli.run_command("t5x_like.feedback", COMMANDS)
