"""The feedback store (SQLite, WAL) and its export back into training data.

    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_sft.jsonl --format=sft
    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_pref.jsonl \
        --format=preference

The entry point only: the job is t5x_like/serving/feedback.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from absl import flags

    from t5x_like.core import cli
    from t5x_like.serving.feedback import DB_NAME, FORMATS, main

    flags.DEFINE_string("db", None, f"Feedback database (the server's <workdir>/{DB_NAME}).",
                        required=True)
    flags.DEFINE_string("out", None, "JSONL file to write.", required=True)
    flags.DEFINE_enum("format", "sft", list(FORMATS),
                      "sft: conversations; preference: (prompt, chosen, rejected) pairs.")
    cli.run(main)
