"""The feedback store (SQLite, WAL) and its export back into training data.

    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_sft.jsonl --format=sft
    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_pref.jsonl \
        --format=preference

The server (t5x_like/serving/server.py) writes three tables in `<workdir>/feedback.sqlite`:

    conversations  id, created
    responses      (id, choice) -> conversation_id, prompt (JSON messages, ending with the user
                   turn), content, finish_reason, model, model_step, sampling (JSON: temperature,
                   top_p, max_tokens, stop, seed, n), token counts, and the response it
                   regenerates (regenerates_id, regenerates_choice) if any
    feedback       response (id, choice), conversation_id, rating (up/down), correction (a
                   better reply), problem + problem_kind (bias/harm/error/other), chosen (this
                   alternative was preferred among regenerations)

A response is one choice of one chat completion: the completion id the client got plus the
choice index (0 unless the request asked for n > 1). Several feedback rows may name the same
response (a user changes their mind); the export reads the latest rating, the latest
correction, any problem report, and the latest "chosen" in a regeneration group.

Export formats, JSONL, exactly the records the data pipeline's `chat:<path>` and
`preference:<path>` sources read:

    sft:         {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant",
                  "content": "..."}]}
                 one per upvoted reply (the prompt + the reply) and per corrected reply (the
                 prompt + the correction); a reply with a problem report is never used as is.
    preference:  {"prompt": [messages ending with the user turn], "chosen": "...",
                  "rejected": "..."}
                 (corrected > original); (upvoted > downvoted) for the same prompt, where a
                 reported reply counts as downvoted; (chosen regeneration > each other
                 alternative of the same prompt).

Both are deduplicated (same messages; same prompt, chosen and rejected) and the counts of each
kind are printed. Why SQLite in WAL mode: one file in the workdir, readers (an export) never
block the server's writes, and every write is one transaction behind a lock, so concurrent
requests never lose a row.
"""

import collections
import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any, Iterable, Sequence

from t5x_like.core.errors import UserError

RATINGS = ("up", "down")
PROBLEM_KINDS = ("bias", "harm", "error", "other")
FORMATS = ("sft", "preference")
DB_NAME = "feedback.sqlite"  # in the served workdir unless --db says otherwise

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    model TEXT NOT NULL,
    model_step INTEGER NOT NULL,
    sampling TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    regenerates_id TEXT,
    regenerates_choice INTEGER,
    PRIMARY KEY (id, choice)
);
CREATE INDEX IF NOT EXISTS responses_by_conversation ON responses(conversation_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    created REAL NOT NULL,
    rating TEXT CHECK (rating IN ('up', 'down')),
    correction TEXT,
    problem TEXT,
    problem_kind TEXT CHECK (problem_kind IN ('bias', 'harm', 'error', 'other')),
    chosen INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (response_id, choice) REFERENCES responses(id, choice)
);
CREATE INDEX IF NOT EXISTS feedback_by_response ON feedback(response_id, choice);
"""


class UnknownResponse(UserError):
    """Feedback or a regeneration names a response the store does not have."""


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; writes open BEGIN IMMEDIATE themselves,
    # so a writer takes the lock up front instead of failing half-way on an upgrade.
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Store:
    """One SQLite connection shared by the server's threads; every write holds `_lock`."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserError(f"cannot create the feedback database {path}: folder {folder} "
                            "does not exist; create it or pass another --db.")
        self.path = path
        self._lock = threading.Lock()
        self._conn = _connect(path)
        # WAL: readers (an export, a dashboard) never block the server's writes. NORMAL sync
        # is durable across a crash of the server; only an OS crash may lose the last commits.
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, statements: Iterable[tuple[str, Sequence]]) -> sqlite3.Cursor:
        """Runs the statements as one transaction; returns the cursor of the last one."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    cur.execute(sql, args)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return cur

    def add_responses(self, *, response_id: str, conversation_id: str, prompt: list[dict],
                      choices: Sequence[dict], model: str, model_step: int, sampling: dict,
                      prompt_tokens: int, regenerates: tuple[str, int] | None = None) -> None:
        """Stores the choices of one completion (each {"content", "finish_reason",
        "completion_tokens"}) and creates the conversation if it is new."""
        now = time.time()
        prompt_json = json.dumps(prompt, ensure_ascii=False)
        sampling_json = json.dumps(sampling, sort_keys=True)
        regen_id, regen_choice = regenerates or (None, None)
        rows = [("INSERT OR IGNORE INTO conversations (id, created) VALUES (?, ?)",
                 (conversation_id, now))]
        for i, c in enumerate(choices):
            rows.append((
                "INSERT INTO responses (id, choice, conversation_id, created, prompt, content, "
                "finish_reason, model, model_step, sampling, prompt_tokens, completion_tokens, "
                "regenerates_id, regenerates_choice) VALUES (" + ", ".join("?" * 14) + ")",
                (response_id, i, conversation_id, now, prompt_json, c["content"],
                 c["finish_reason"], model, int(model_step), sampling_json, int(prompt_tokens),
                 int(c["completion_tokens"]), regen_id, regen_choice)))
        self._write(rows)

    def response(self, response_id: str, choice: int = 0) -> dict:
        """The stored response; UnknownResponse if there is none."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM responses WHERE id = ? AND choice = ?",
                                     (response_id, choice)).fetchone()
        if row is None:
            raise UnknownResponse(f"no response {response_id!r} with index {choice}; use the "
                                  "id (and choice index) of a completion this server returned.")
        out = dict(row)
        out["prompt"] = json.loads(out["prompt"])
        out["sampling"] = json.loads(out["sampling"])
        return out

    def add_feedback(self, *, response_id: str, choice: int = 0, rating: str | None = None,
                     correction: str | None = None, problem: str | None = None,
                     problem_kind: str | None = None, chosen: bool = False,
                     conversation_id: str | None = None) -> dict:
        """Stores one feedback row for a response; returns {"id", "conversation_id"}."""
        if rating is not None and rating not in RATINGS:
            raise UserError(f"rating {rating!r} is not one of {', '.join(RATINGS)}; send 'up', "
                            "'down' or leave it out.")
        if problem_kind is not None and problem_kind not in PROBLEM_KINDS:
            raise UserError(f"problem_kind {problem_kind!r} is not one of "
                            f"{', '.join(PROBLEM_KINDS)}.")
        correction = correction if correction and correction.strip() else None
        problem = problem if problem and problem.strip() else None
        if problem_kind and not problem:
            problem = ""  # a kind alone is still a report ("this is biased")
        if problem is not None and problem_kind is None:
            problem_kind = "other"
        if rating is None and correction is None and problem is None and not chosen:
            raise UserError("the feedback says nothing: send a rating, a correction, a "
                            "problem report or chosen=true.")
        stored = self.response(response_id, choice)
        if conversation_id is not None and conversation_id != stored["conversation_id"]:
            raise UserError(f"response {response_id!r} belongs to conversation "
                            f"{stored['conversation_id']!r}, not {conversation_id!r}; send the "
                            "conversation id the completion returned, or leave it out.")
        cur = self._write([(
            "INSERT INTO feedback (response_id, choice, conversation_id, created, rating, "
            "correction, problem, problem_kind, chosen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (response_id, choice, stored["conversation_id"], time.time(), rating, correction,
             problem, problem_kind, int(bool(chosen))))])
        return {"id": cur.lastrowid, "conversation_id": stored["conversation_id"]}

    def count(self, table: str) -> int:
        if table not in ("conversations", "responses", "feedback"):
            raise ValueError(f"no table {table!r}")
        with self._lock:
            return self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# -- export -------------------------------------------------------------------------------------


def _responses_with_feedback(path: str) -> list[dict]:
    """Every response with its folded feedback: rating, correction, reported, chosen_at."""
    if not os.path.isfile(path):
        raise UserError(f"no feedback database at {path}; pass the --db the server wrote "
                        f"(by default <workdir>/{DB_NAME}).")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    conn.row_factory = sqlite3.Row
    try:
        responses = {(r["id"], r["choice"]): dict(r) for r in conn.execute(
            "SELECT * FROM responses ORDER BY created, id, choice")}
        feedback = conn.execute("SELECT * FROM feedback ORDER BY id").fetchall()
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path} is not a t5x_like feedback database ({e}).") from None
    finally:
        conn.close()
    for r in responses.values():
        r["prompt"] = json.loads(r["prompt"])
        r.update(rating=None, correction=None, reported=False, chosen_at=0)
    for f in feedback:  # in order: later rows override earlier ratings and corrections
        r = responses.get((f["response_id"], f["choice"]))
        if r is None:
            continue
        if f["rating"] is not None:
            r["rating"] = f["rating"]
        if f["correction"]:
            r["correction"] = f["correction"]
        if f["problem"] is not None or f["problem_kind"] is not None:
            r["reported"] = True
        if f["chosen"]:
            r["chosen_at"] = f["id"]
    return list(responses.values())


def _add_unique(record: dict, kind: str, records: list, seen: set, counts) -> None:
    """Appends `record` (counted under `kind`) unless an equal one is already there."""
    key = _key(record)
    if key in seen:
        counts["duplicates"] += 1
        return
    seen.add(key)
    counts[kind] += 1
    records.append(record)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def sft_records(responses: list[dict]) -> tuple[list[dict], dict]:
    """Upvoted and corrected replies as conversations; returns (records, counts)."""
    records, seen = [], set()
    counts = collections.Counter(upvoted=0, corrected=0, duplicates=0)
    for r in responses:
        if r["correction"] is not None:
            kind, reply = "corrected", r["correction"]
        elif r["rating"] == "up" and not r["reported"]:
            kind, reply = "upvoted", r["content"]
        else:
            continue
        _add_unique({"messages": r["prompt"] + [{"role": "assistant", "content": reply}]},
                    kind, records, seen, counts)
    return records, dict(counts)


def _regeneration_root(r: dict, by_id: dict) -> tuple:
    key, hops = (r["id"], r["choice"]), 0
    while by_id[key]["regenerates_id"] is not None and hops < len(by_id):
        parent = (by_id[key]["regenerates_id"], by_id[key]["regenerates_choice"])
        if parent not in by_id:
            break
        key, hops = parent, hops + 1
    return key


def preference_records(responses: list[dict]) -> tuple[list[dict], dict]:
    """(chosen, rejected) pairs from corrections, ratings and regenerations."""
    pairs: list[tuple[str, list, str, str]] = []  # (kind, prompt, chosen, rejected)
    for r in responses:
        if r["correction"] is not None:
            pairs.append(("corrected", r["prompt"], r["correction"], r["content"]))

    by_prompt = collections.defaultdict(list)
    for r in responses:
        by_prompt[_key(r["prompt"])].append(r)
    for group in by_prompt.values():
        ups = [r for r in group if r["rating"] == "up" and not r["reported"]]
        downs = [r for r in group if r["rating"] == "down" or r["reported"]]
        for u in ups:
            for d in downs:
                pairs.append(("rated", u["prompt"], u["content"], d["content"]))

    by_id = {(r["id"], r["choice"]): r for r in responses}
    parents = {(r["regenerates_id"], r["regenerates_choice"]) for r in responses
               if r["regenerates_id"] is not None}
    groups = collections.defaultdict(list)
    for r in responses:
        if r["regenerates_id"] is not None or (r["id"], r["choice"]) in parents:
            groups[_regeneration_root(r, by_id)].append(r)
    for group in groups.values():
        chosen = max(group, key=lambda r: r["chosen_at"])
        if not chosen["chosen_at"]:
            continue  # regenerated, but no alternative was preferred
        for other in group:
            if other is not chosen and _key(other["prompt"]) == _key(chosen["prompt"]):
                pairs.append(("regenerated", chosen["prompt"], chosen["content"],
                              other["content"]))

    records, seen = [], set()
    counts = collections.Counter(corrected=0, rated=0, regenerated=0, duplicates=0, identical=0)
    for kind, prompt, chosen_text, rejected_text in pairs:
        if chosen_text == rejected_text:
            counts["identical"] += 1  # no preference to learn from two equal replies
            continue
        _add_unique({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text},
                    kind, records, seen, counts)
    return records, dict(counts)


def export(db: str, out: str, fmt: str) -> dict:
    """Writes `out` (JSONL) from the database `db` in format `fmt`; returns the counts."""
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt} is not one of {', '.join(FORMATS)}.")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UserError(f"cannot write {out}: folder {out_dir} does not exist.")
    responses = _responses_with_feedback(db)
    records, counts = (sft_records if fmt == "sft" else preference_records)(responses)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)  # never a half-written file under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    counts["written"] = len(records)
    return counts


def main(argv):
    from absl import flags

    f = flags.FLAGS
    if argv[1:] != ["export"]:
        raise UserError(f"unknown command {' '.join(argv[1:]) or '(none)'}; use: python -m "
                        "t5x_like.feedback export --db=... --out=... --format=sft|preference")
    counts = export(f.db, f.out, f.format)
    kinds = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "written")
    print(f"{f.format}: wrote {counts['written']} records to {f.out} ({kinds})")
    sys.stdout.flush()
