"""Export what the chat server collected as training data, after a review if wanted.

    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_sft.jsonl --format=sft
    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_pref.jsonl \
        --format=preference [--reviewed_only]
    python -m t5x_like.feedback review --db=runs/sft/feedback.sqlite --out=review/
    python -m t5x_like.feedback verdicts --db=runs/sft/feedback.sqlite --verdicts=verdicts.json

The entry point only: the job is t5x_like/serving/feedback.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from absl import flags

    from t5x_like.core import cli
    from t5x_like.serving.feedback import DB_NAME, FORMATS, main

    # One set of flags for every command (each names the ones it needs), so a mistyped command
    # is named as such rather than as an unknown flag.
    flags.DEFINE_string("db", None, f"Feedback database (the server's <workdir>/{DB_NAME}).")
    flags.DEFINE_string("out", None, "export: JSONL file to write; review: a new folder for "
                        "sheet.html and sheet.csv.")
    flags.DEFINE_enum("format", "sft", list(FORMATS),
                      "sft: conversations; preference: (prompt, chosen, rejected) pairs.")
    flags.DEFINE_bool("reviewed_only", False, "export: use a correction or report only once a "
                      "review approved it; replies with one not yet reviewed are left out.")
    flags.DEFINE_bool("include_reviewed", False, "review: also list items that have a verdict.")
    flags.DEFINE_string("verdicts", None, "verdicts: the sheet's downloaded verdicts .json or "
                        "the filled sheet.csv.")
    cli.run(main)
