"""The constructors every evaluation recipe here builds on: `suite()` and `task(kind, source,
...)`, with every default of a suite and of its tasks (in t5x_like/evaluation/suites.py, so the
library never imports configs/).

Any key can be overridden on the command line: `--config.tasks.ntrex_en_de.n=20
--config.batch_size=32`. Tasks run in the order of their names. README.md ("Evaluation") lists
the sources.
"""

from t5x_like.evaluation.suites import suite, task  # noqa: F401 (recipes call common.suite())
