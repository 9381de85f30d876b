"""The feedback store (SQLite, WAL), its review, and its export back into training data.

    python -m t5x_like.feedback export --db=runs/sft/feedback.sqlite --out=fb_sft.jsonl --format=sft
    python -m t5x_like.feedback export --db=... --out=fb_pref.jsonl --format=preference
    python -m t5x_like.feedback review --db=... --out=review/        (a sheet to approve/reject)
    python -m t5x_like.feedback verdicts --db=... --verdicts=review/sheet.csv  (read it back)
    python -m t5x_like.feedback export --db=... --out=... --reviewed_only

The server (t5x_like/serving/server.py) writes these tables in `<workdir>/feedback.sqlite`:

    conversations  id (issued by the server), created, title (set by a rename)
    responses      (id, choice) -> conversation_id, prompt (JSON messages, ending with the user
                   turn), content, finish_reason, model, model_step, sampling (JSON: temperature,
                   top_p, max_tokens, stop, seed, n), token counts, the response it regenerates
                   (regenerates_id, regenerates_choice) and the earlier response whose reply is
                   the last assistant turn of its prompt (parent_id, parent_choice), which is
                   how a conversation's history is rebuilt even after old turns were dropped
    feedback       response (id, choice), conversation_id, rating (up/down), correction (a
                   better reply), problem + problem_kind (bias/harm/error/other), chosen (this
                   alternative was preferred among regenerations)
    idempotency    Idempotency-Key -> the completion or feedback row it made, so a client
                   retrying after a lost answer gets the stored one instead of a second row
    reviews        feedback id -> verdict (approve/reject) read back from a review sheet

A response is one choice of one chat completion: the completion id the client got plus the
choice index (0 unless the request asked for n > 1). Several feedback rows may name the same
response (a user changes their mind); the export reads the latest rating, the latest
correction, any problem report, and the latest "chosen" in a regeneration group.

Export formats, JSONL, exactly the records the data pipeline's `chat:<path>` and
`preference:<path>` sources read:

    sft:         {"messages": [..., {"role": "assistant", "content": "..."}]}
                 one per upvoted reply (the prompt + the reply) and per corrected reply (the
                 prompt + the correction); a reply with a problem report is never used as is.
    preference:  {"prompt": [messages ending with the user turn], "chosen": "...",
                  "rejected": "..."}
                 (corrected > original); (upvoted > downvoted) for the same prompt, where a
                 reported reply counts as downvoted; (chosen regeneration > each other
                 alternative of the same prompt).

What the export leaves out, each counted in the printed line:
    length_cut        a reply that ended at max_tokens (finish_reason "length"): written as a
                      turn it would teach the model to close a reply it never finished
    replacement_char  a record with U+FFFD in it (a reply decoded from broken UTF-8 bytes)
    empty_reports     a report with neither text nor a correction (not counted as a report)
    rejected          corrections and reports a reviewer rejected (ignored, as if not given)
    unreviewed        with --reviewed_only: replies whose correction or report has no verdict
    duplicates, identical  the same record twice; a pair of two equal replies

Review: `review` writes <out>/sheet.html (approve or reject each correction and report, then
download the verdicts) and <out>/sheet.csv (fill the verdict column); `verdicts` stores them;
`export --reviewed_only` then uses a correction or report only once it is approved (ratings
and regeneration choices, clicks on the model's own text, are used as they are).

Why SQLite in WAL mode: one file in the workdir, readers (an export) never block the server's
writes, and every write is one transaction behind a lock, so concurrent requests never lose a
row.
"""

import collections
import csv
import hashlib
import html
import io
import json
import os
import secrets
import shutil
import sqlite3
import sys
import threading
import time
from typing import Any, Iterable, Sequence

from t5x_like.core.errors import UserError

RATINGS = ("up", "down")
PROBLEM_KINDS = ("bias", "harm", "error", "other")
FORMATS = ("sft", "preference")
VERDICTS = ("approve", "reject")
DB_NAME = "feedback.sqlite"  # in the served workdir unless --db says otherwise
TITLE_CHARS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    title TEXT
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
    parent_id TEXT,
    parent_choice INTEGER,
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
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    target TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (
    feedback_id INTEGER PRIMARY KEY REFERENCES feedback(id) ON DELETE CASCADE,
    verdict TEXT NOT NULL CHECK (verdict IN ('approve', 'reject')),
    note TEXT,
    sheet TEXT,
    created REAL NOT NULL
);
"""
# Columns added since the first release: (table, column, type); added to older databases.
_ADDED_COLUMNS = (("conversations", "title", "TEXT"), ("responses", "parent_id", "TEXT"),
                  ("responses", "parent_choice", "INTEGER"))


class UnknownResponse(UserError):
    """Feedback or a regeneration names a response the store does not have."""


class UnknownConversation(UserError):
    """A conversation id the server never issued (or one that was deleted)."""


class IdempotencyConflict(UserError):
    """An Idempotency-Key sent again with a different request."""


def request_hash(body: Any) -> str:
    """A fingerprint of a request body: a retry must send the same request as the first try."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False)
                          .encode()).hexdigest()


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; writes open BEGIN IMMEDIATE themselves,
    # so a writer takes the lock up front instead of failing half-way on an upgrade.
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _upgrade(conn: sqlite3.Connection) -> None:
    for table, column, kind in _ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _is_report(f) -> bool:
    return f["problem"] is not None or f["problem_kind"] is not None


def _report_has_content(f) -> bool:
    return bool((f["problem"] or "").strip() or (f["correction"] or "").strip())


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
        # Columns added since the first release, then the index on them: one transaction, so
        # two processes opening an old database never both add a column.
        self._transaction(lambda cur: (_upgrade(cur), cur.execute(
            "CREATE INDEX IF NOT EXISTS responses_by_parent ON responses(parent_id, "
            "parent_choice)")))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _read(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _transaction(self, work):
        """Runs `work(cursor)` as one write transaction (under the lock); returns its result."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                out = work(cur)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return out

    # -- idempotency ---------------------------------------------------------------------------

    @staticmethod
    def _claimed(cur, key: str | None, route: str, body_hash: str | None) -> str | None:
        """The target an earlier request with `key` made (None if none); a different request
        under the same key is an IdempotencyConflict."""
        if key is None:
            return None
        row = cur.execute("SELECT route, request_hash, target FROM idempotency WHERE key = ?",
                          (key,)).fetchone()
        if row is None:
            return None
        if row["route"] != route or row["request_hash"] != body_hash:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used for a different request; send a new "
                "key with each new request and the same key only when retrying that request.")
        return row["target"]

    @staticmethod
    def _claim(cur, key: str | None, route: str, body_hash: str | None, target: str) -> None:
        if key is not None:
            cur.execute("INSERT OR REPLACE INTO idempotency (key, route, request_hash, target, "
                        "created) "
                        "VALUES (?, ?, ?, ?, ?)", (key, route, body_hash or "", target,
                                                   time.time()))

    def replayed_completion(self, key: str, body_hash: str) -> list[dict] | None:
        """The stored choices of the completion an earlier request with `key` made, or None."""
        with self._lock:
            target = self._claimed(self._conn, key, "completion", body_hash)
        if target is None:
            return None
        rows = self._read("SELECT * FROM responses WHERE id = ? ORDER BY choice", (target,))
        return [self._decoded(r) for r in rows] or None

    # -- writes --------------------------------------------------------------------------------

    def create_conversation(self, conversation_id: str) -> None:
        """Records an id the server issues (only issued ids may be continued)."""
        self._transaction(lambda cur: cur.execute(
            "INSERT OR IGNORE INTO conversations (id, created) VALUES (?, ?)",
            (conversation_id, time.time())))

    def has_conversation(self, conversation_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)))

    @staticmethod
    def _parent(cur, conversation_id: str, prompt: list[dict]) -> tuple | None:
        """The stored response this prompt continues: the latest one in the conversation whose
        reply and user turn are the prompt's last exchange before its new user turn. Matching
        the last exchange only (not the whole prompt) still finds it when the client dropped the
        oldest turns to fit the context."""
        turns = [m for m in prompt if m["role"] != "system"]
        if len(turns) < 3 or turns[-2]["role"] != "assistant" or turns[-3]["role"] != "user":
            return None
        for row in cur.execute("SELECT id, choice, prompt FROM responses WHERE conversation_id = ?"
                               " AND content = ? ORDER BY created DESC, rowid DESC",
                               (conversation_id, turns[-2]["content"])):
            earlier = json.loads(row["prompt"])
            if earlier and earlier[-1]["role"] == "user" and \
                    earlier[-1]["content"] == turns[-3]["content"]:
                return row["id"], row["choice"]
        return None

    def add_responses(self, *, response_id: str, conversation_id: str, prompt: list[dict],
                      choices: Sequence[dict], model: str, model_step: int, sampling: dict,
                      prompt_tokens: int, regenerates: tuple[str, int] | None = None,
                      idempotency_key: str | None = None, body_hash: str | None = None,
                      parent: tuple[str, int] | None = None) -> bool:
        """Stores the choices of one completion (each {"content", "finish_reason",
        "completion_tokens"}) and creates the conversation if it is new. `parent`: the response
        it continues, when the client said (else found from the prompt's last exchange).

        With `idempotency_key`, records that the key made this completion; if the key already
        made one (a retry that raced the first try), stores nothing and returns False.
        """
        now = time.time()
        prompt_json = json.dumps(prompt, ensure_ascii=False)
        sampling_json = json.dumps(sampling, sort_keys=True)
        regen_id, regen_choice = regenerates or (None, None)

        def work(cur):
            if self._claimed(cur, idempotency_key, "completion", body_hash) is not None:
                return False
            cur.execute("INSERT OR IGNORE INTO conversations (id, created) VALUES (?, ?)",
                        (conversation_id, now))
            if regenerates is not None:  # an alternative continues what the original did
                row = cur.execute("SELECT parent_id, parent_choice FROM responses WHERE id = ? "
                                  "AND choice = ?", regenerates).fetchone()
                found = (row["parent_id"], row["parent_choice"]) if row else None
            else:
                found = parent or self._parent(cur, conversation_id, prompt)
            parent_id, parent_choice = found or (None, None)
            for i, c in enumerate(choices):
                # OR IGNORE: the same completion id stored twice is one row, not an error.
                cur.execute(
                    "INSERT OR IGNORE INTO responses (id, choice, conversation_id, created, "
                    "prompt, content, finish_reason, model, model_step, sampling, prompt_tokens, "
                    "completion_tokens, regenerates_id, regenerates_choice, parent_id, "
                    "parent_choice) VALUES (" + ", ".join("?" * 16) + ")",
                    (response_id, i, conversation_id, now, prompt_json, c["content"],
                     c["finish_reason"], model, int(model_step), sampling_json,
                     int(prompt_tokens), int(c["completion_tokens"]), regen_id, regen_choice,
                     parent_id, parent_choice))
            self._claim(cur, idempotency_key, "completion", body_hash, response_id)
            return True

        return self._transaction(work)

    @staticmethod
    def _decoded(row) -> dict:
        out = dict(row)
        out["prompt"] = json.loads(out["prompt"])
        out["sampling"] = json.loads(out["sampling"])
        return out

    def response(self, response_id: str, choice: int = 0) -> dict:
        """The stored response; UnknownResponse if there is none."""
        rows = self._read("SELECT * FROM responses WHERE id = ? AND choice = ?",
                          (response_id, choice))
        if not rows:
            raise UnknownResponse(f"no response {response_id!r} with index {choice}; use the "
                                  "id (and choice index) of a completion this server returned.")
        return self._decoded(rows[0])

    def add_feedback(self, *, response_id: str, choice: int = 0, rating: str | None = None,
                     correction: str | None = None, problem: str | None = None,
                     problem_kind: str | None = None, chosen: bool = False,
                     conversation_id: str | None = None, idempotency_key: str | None = None,
                     body_hash: str | None = None) -> dict:
        """Stores one feedback row for a response; returns {"id", "conversation_id"} (the
        earlier row's, with "replayed": True, when `idempotency_key` already made one)."""
        if rating is not None and rating not in RATINGS:
            raise UserError(f"rating {rating!r} is not one of {', '.join(RATINGS)}; send 'up', "
                            "'down' or leave it out.")
        if problem_kind is not None and problem_kind not in PROBLEM_KINDS:
            raise UserError(f"problem_kind {problem_kind!r} is not one of "
                            f"{', '.join(PROBLEM_KINDS)}.")
        correction = correction if correction and correction.strip() else None
        problem = problem if problem and problem.strip() else None
        if problem_kind is not None and problem is None and correction is None:
            raise UserError("a problem report needs 'problem' (what is wrong) or 'correction' "
                            "(a better reply) besides its problem_kind.")
        if problem is not None and problem_kind is None:
            problem_kind = "other"
        if problem_kind is not None and problem is None:
            problem = ""  # reported with a correction only: still a report of its kind
        if rating is None and correction is None and problem is None and not chosen:
            raise UserError("the feedback says nothing: send a rating, a correction, a "
                            "problem report or chosen=true.")

        def work(cur):
            earlier = self._claimed(cur, idempotency_key, "feedback", body_hash)
            if earlier is not None:
                row = cur.execute("SELECT id, conversation_id FROM feedback WHERE id = ?",
                                  (int(earlier),)).fetchone()
                if row is not None:
                    return {"id": row["id"], "conversation_id": row["conversation_id"],
                            "replayed": True}
            stored = cur.execute("SELECT conversation_id FROM responses WHERE id = ? AND "
                                 "choice = ?", (response_id, choice)).fetchone()
            if stored is None:
                raise UnknownResponse(f"no response {response_id!r} with index {choice}; use "
                                      "the id (and choice index) of a completion this server "
                                      "returned.")
            if conversation_id is not None and conversation_id != stored["conversation_id"]:
                raise UserError(f"response {response_id!r} belongs to conversation "
                                f"{stored['conversation_id']!r}, not {conversation_id!r}; send "
                                "the conversation id the completion returned, or leave it out.")
            cur.execute(
                "INSERT INTO feedback (response_id, choice, conversation_id, created, rating, "
                "correction, problem, problem_kind, chosen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (response_id, choice, stored["conversation_id"], time.time(), rating,
                 correction, problem, problem_kind, int(bool(chosen))))
            fid = cur.lastrowid
            self._claim(cur, idempotency_key, "feedback", body_hash, str(fid))
            return {"id": fid, "conversation_id": stored["conversation_id"]}

        return self._transaction(work)

    def count(self, table: str) -> int:
        if table not in ("conversations", "responses", "feedback", "reviews", "idempotency"):
            raise ValueError(f"no table {table!r}")
        return self._read(f"SELECT COUNT(*) FROM {table}")[0][0]

    # -- conversations (the web page's history) ------------------------------------------------

    def conversations(self, limit: int = 100) -> list[dict]:
        """Conversations with at least one reply, most recently active first."""
        rows = self._read(
            "SELECT c.id, c.created, c.title, MAX(r.created) AS updated, "
            "COUNT(DISTINCT r.id) AS replies, "
            "(SELECT prompt FROM responses f WHERE f.conversation_id = c.id "
            " ORDER BY f.created, f.rowid LIMIT 1) AS first_prompt "
            "FROM conversations c JOIN responses r ON r.conversation_id = c.id "
            "GROUP BY c.id ORDER BY updated DESC LIMIT ?", (limit,))
        out = []
        for r in rows:
            title = r["title"]
            if not title:
                users = [m["content"] for m in json.loads(r["first_prompt"])
                         if m["role"] == "user"]
                title = " ".join((users[0] if users else "").split())[:80] or "(empty)"
            out.append({"id": r["id"], "title": title, "created": r["created"],
                        "updated": r["updated"], "replies": r["replies"]})
        return out

    def conversation(self, conversation_id: str) -> dict:
        """The conversation as the page shows it: the turns leading to its latest reply, each
        assistant turn with its alternatives (regenerations, n > 1 choices) and their feedback.
        """
        head = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not head:
            raise UnknownConversation(f"no conversation {conversation_id!r}; it was deleted or "
                                      "this server never issued it.")
        rows = [self._decoded(r) for r in self._read(
            "SELECT * FROM responses WHERE conversation_id = ? ORDER BY created, rowid",
            (conversation_id,))]
        notes = collections.defaultdict(dict)
        for f in self._read("SELECT * FROM feedback WHERE conversation_id = ? ORDER BY id",
                            (conversation_id,)):
            n = notes[(f["response_id"], f["choice"])]
            if f["rating"] is not None:
                n["rating"] = f["rating"]
            if _is_report(f):
                n["reported"] = True
            if f["correction"]:
                n["corrected"] = True
            if f["chosen"]:
                n["chosen"] = True
        return {"id": conversation_id, "title": head[0]["title"], "created": head[0]["created"],
                **_transcript(rows, notes)}

    def rename_conversation(self, conversation_id: str, title: str) -> None:
        title = " ".join(title.split())[:TITLE_CHARS]
        cur = self._transaction(lambda cur: cur.execute(
            "UPDATE conversations SET title = ? WHERE id = ?", (title or None, conversation_id)))
        if not cur.rowcount:
            raise UnknownConversation(f"no conversation {conversation_id!r}.")

    def delete_conversation(self, conversation_id: str) -> dict:
        """Deletes the conversation, its replies and their feedback (the user asked to)."""
        def work(cur):
            counts = {}
            cur.execute("DELETE FROM reviews WHERE feedback_id IN (SELECT id FROM feedback "
                        "WHERE conversation_id = ?)", (conversation_id,))
            # Keys of deleted rows go too: a retry must not find a key pointing at nothing.
            cur.execute("DELETE FROM idempotency WHERE (route = 'feedback' AND target IN (SELECT "
                        "CAST(id AS TEXT) FROM feedback WHERE conversation_id = ?)) OR (route = "
                        "'completion' AND target IN (SELECT id FROM responses WHERE "
                        "conversation_id = ?))", (conversation_id, conversation_id))
            for table in ("feedback", "responses"):
                cur.execute(f"DELETE FROM {table} WHERE conversation_id = ?", (conversation_id,))
                counts[table] = cur.rowcount
            cur.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if not cur.rowcount:
                raise UnknownConversation(f"no conversation {conversation_id!r}.")
            return counts
        return self._transaction(work)

    # -- review --------------------------------------------------------------------------------

    def add_verdicts(self, verdicts: Iterable[tuple[int, str, str]], sheet: str = "") -> int:
        """Stores (feedback id, verdict, note) triples; a later verdict replaces an earlier."""
        verdicts = list(verdicts)

        def work(cur):
            for fid, verdict, note in verdicts:
                if verdict not in VERDICTS:
                    raise UserError(f"verdict {verdict!r} for feedback {fid} is not one of "
                                    f"{', '.join(VERDICTS)}.")
                cur.execute("INSERT OR REPLACE INTO reviews (feedback_id, verdict, note, sheet, "
                            "created) VALUES (?, ?, ?, ?, ?)",
                            (int(fid), verdict, note or None, sheet, time.time()))
            return len(verdicts)
        return self._transaction(work)


def _transcript(rows: list[dict], notes: dict) -> dict:
    """Turns from the stored responses of one conversation (see Store.conversation)."""
    if not rows:
        return {"system": "", "turns": [], "dropped": 0}
    by_key = {(r["id"], r["choice"]): r for r in rows}

    def group_of(key):  # the first response of its regeneration chain, by completion id
        seen = 0
        while by_key[key]["regenerates_id"] is not None and seen < len(by_key):
            parent = (by_key[key]["regenerates_id"], by_key[key]["regenerates_choice"])
            if parent not in by_key:
                break
            key, seen = parent, seen + 1
        return key[0]

    groups = collections.defaultdict(list)
    for r in rows:
        groups[group_of((r["id"], r["choice"]))].append(r)
    chain = []  # (group, the alternative on the path), from the latest reply back
    current = rows[-1]
    visited = set()
    while current is not None:
        gid = group_of((current["id"], current["choice"]))
        if gid in visited:
            break
        visited.add(gid)
        chain.append((groups[gid], current))
        parent = (current["parent_id"], current["parent_choice"])
        current = by_key.get(parent) if parent[0] is not None else None
    chain.reverse()

    first_prompt = chain[0][1]["prompt"]
    system = next((m["content"] for m in first_prompt if m["role"] == "system"), "")
    # Turns before the first stored exchange (a client that sent a history of its own).
    turns = [{"role": m["role"], "content": m["content"]} for m in first_prompt[:-1]
             if m["role"] != "system"]
    for group, on_path in chain:
        turns.append({"role": "user", "content": on_path["prompt"][-1]["content"]})
        alternatives = [{"id": r["id"], "index": r["choice"], "content": r["content"],
                         "finish_reason": r["finish_reason"],
                         **notes.get((r["id"], r["choice"]), {})} for r in group]
        turns.append({"role": "assistant", "alternatives": alternatives,
                      "current": group.index(on_path)})
    last_prompt = chain[-1][1]["prompt"]
    sent = len([m for m in last_prompt if m["role"] != "system"]) + 1  # + the reply
    return {"system": system, "turns": turns, "dropped": max(0, len(turns) - sent)}


# -- export -------------------------------------------------------------------------------------


def _read_db(path: str) -> tuple[dict, list, dict]:
    """(responses by key, feedback rows, verdicts by feedback id) read-only."""
    if not os.path.isfile(path):
        raise UserError(f"no feedback database at {path}; pass the --db the server wrote "
                        f"(by default <workdir>/{DB_NAME}).")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    conn.row_factory = sqlite3.Row
    try:
        responses = {(r["id"], r["choice"]): dict(r) for r in conn.execute(
            "SELECT * FROM responses ORDER BY created, id, choice")}
        feedback = [dict(f) for f in conn.execute("SELECT * FROM feedback ORDER BY id")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        verdicts = ({r["feedback_id"]: r["verdict"] for r in conn.execute(
            "SELECT feedback_id, verdict FROM reviews")} if "reviews" in tables else {})
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path} is not a t5x_like feedback database ({e}).") from None
    finally:
        conn.close()
    return responses, feedback, verdicts


def _responses_with_feedback(path: str, *, reviewed_only: bool = False
                             ) -> tuple[list[dict], collections.Counter]:
    """Every response with its folded feedback (rating, correction, reported, chosen_at), and
    the counts of what was set aside (empty reports, rejected, unreviewed)."""
    responses, feedback, verdicts = _read_db(path)
    counts = collections.Counter()
    for r in responses.values():
        r["prompt"] = json.loads(r["prompt"])
        r.update(rating=None, correction=None, reported=False, chosen_at=0, unreviewed=False)
    for f in feedback:  # in order: later rows override earlier ratings and corrections
        r = responses.get((f["response_id"], f["choice"]))
        if r is None:
            continue
        if f["rating"] is not None:
            r["rating"] = f["rating"]
        if f["chosen"]:
            r["chosen_at"] = f["id"]
        report = _is_report(f)
        if report and not _report_has_content(f):
            counts["empty_reports"] += 1  # a kind alone says too little to act on
            continue
        if not (report or f["correction"]):
            continue
        verdict = verdicts.get(f["id"])
        if verdict == "reject":
            counts["rejected"] += 1
            continue
        if verdict is None and reviewed_only:
            r["unreviewed"] = True
            continue
        if f["correction"]:
            r["correction"] = f["correction"]
        if report:
            r["reported"] = True
    out = []
    for r in responses.values():
        if r["unreviewed"]:
            counts["unreviewed"] += 1  # left out whole: its signals wait for a verdict
            continue
        out.append(r)
    return out, counts


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


def _has_replacement_char(*texts) -> bool:
    for t in texts:
        if isinstance(t, list):
            if any("\ufffd" in m["content"] for m in t):
                return True
        elif "\ufffd" in t:
            return True
    return False


def sft_records(responses: list[dict]) -> tuple[list[dict], dict]:
    """Upvoted and corrected replies as conversations; returns (records, counts)."""
    records, seen = [], set()
    counts = collections.Counter(upvoted=0, corrected=0, duplicates=0)
    for r in responses:
        if r["correction"] is not None:
            kind, reply = "corrected", r["correction"]
        elif r["rating"] == "up" and not r["reported"]:
            if r["finish_reason"] == "length":
                counts["length_cut"] += 1
                continue
            kind, reply = "upvoted", r["content"]
        else:
            continue
        if _has_replacement_char(r["prompt"], reply):
            counts["replacement_char"] += 1
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
    # (kind, prompt, chosen, rejected, length-cut reply in the pair)
    pairs: list[tuple[str, list, str, str, bool]] = []
    for r in responses:
        if r["correction"] is not None:
            pairs.append(("corrected", r["prompt"], r["correction"], r["content"],
                          r["finish_reason"] == "length"))

    by_prompt = collections.defaultdict(list)
    for r in responses:
        by_prompt[_key(r["prompt"])].append(r)
    for group in by_prompt.values():
        ups = [r for r in group if r["rating"] == "up" and not r["reported"]]
        downs = [r for r in group if r["rating"] == "down" or r["reported"]]
        for u in ups:
            for d in downs:
                pairs.append(("rated", u["prompt"], u["content"], d["content"],
                              "length" in (u["finish_reason"], d["finish_reason"])))

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
                              other["content"],
                              "length" in (chosen["finish_reason"], other["finish_reason"])))

    records, seen = [], set()
    counts = collections.Counter(corrected=0, rated=0, regenerated=0, duplicates=0, identical=0)
    for kind, prompt, chosen_text, rejected_text, cut in pairs:
        if chosen_text == rejected_text:
            counts["identical"] += 1  # no preference to learn from two equal replies
            continue
        if cut:  # a cut reply scored as a finished one would teach where to end
            counts["length_cut"] += 1
            continue
        if _has_replacement_char(prompt, chosen_text, rejected_text):
            counts["replacement_char"] += 1
            continue
        _add_unique({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text},
                    kind, records, seen, counts)
    return records, dict(counts)


def _check_out_file(out: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UserError(f"cannot write {out}: folder {out_dir} does not exist.")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # never a half-written file under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export(db: str, out: str, fmt: str, *, reviewed_only: bool = False) -> dict:
    """Writes `out` (JSONL) from the database `db` in format `fmt`; returns the counts: records
    of each kind, then what was left out and why (see the module docstring), then "written"."""
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt} is not one of {', '.join(FORMATS)}.")
    _check_out_file(out)
    responses, set_aside = _responses_with_feedback(db, reviewed_only=reviewed_only)
    records, counts = (sft_records if fmt == "sft" else preference_records)(responses)
    for key in ("length_cut", "replacement_char", "empty_reports", "rejected", "unreviewed"):
        counts[key] = counts.get(key, 0) + set_aside.get(key, 0)
    _write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    counts["written"] = len(records)
    return counts


# -- the review sheet ---------------------------------------------------------------------------


def review_items(db: str, *, include_reviewed: bool = False) -> list[dict]:
    """Corrections and reports (with content) to approve or reject, oldest first."""
    responses, feedback, verdicts = _read_db(db)
    items = []
    for f in feedback:
        report = _is_report(f) and _report_has_content(f)
        if not (report or f["correction"]):
            continue
        if f["id"] in verdicts and not include_reviewed:
            continue
        r = responses.get((f["response_id"], f["choice"]))
        if r is None:
            continue
        kind = " + ".join(k for k, on in (("correction", bool(f["correction"])),
                                          (f"report: {f['problem_kind']}", report)) if on)
        items.append({"feedback_id": f["id"], "response_id": f["response_id"],
                      "index": f["choice"], "kind": kind, "prompt": json.loads(r["prompt"]),
                      "reply": r["content"], "finish_reason": r["finish_reason"],
                      "correction": f["correction"] or "", "problem": f["problem"] or "",
                      "verdict": verdicts.get(f["id"], "")})
    return items


def _prompt_text(messages: list[dict]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in messages)


_SHEET_COLUMNS = ("sheet", "feedback_id", "response_id", "index", "kind", "prompt", "reply",
                  "finish_reason", "correction", "problem", "verdict", "note")


def write_review(db: str, out_dir: str, *, include_reviewed: bool = False) -> dict:
    """Writes <out_dir>/sheet.html, sheet.csv and items.json (a new folder); returns
    {"sheet", "items"}."""
    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} already exists; choose a new --out (a sheet is never "
                        "overwritten, so verdicts always match their items).")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {out_dir}: folder {parent} does not exist.")
    items = review_items(db, include_reviewed=include_reviewed)
    sheet = secrets.token_hex(6)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(_SHEET_COLUMNS)
    for it in items:
        writer.writerow([sheet, it["feedback_id"], it["response_id"], it["index"], it["kind"],
                         _prompt_text(it["prompt"]), it["reply"], it["finish_reason"],
                         it["correction"], it["problem"], it["verdict"], ""])
    tmp = f"{out_dir}.tmp{os.getpid()}"
    os.makedirs(tmp)
    try:
        _write_atomic(os.path.join(tmp, "sheet.csv"), buffer.getvalue())
        _write_atomic(os.path.join(tmp, "sheet.html"), _sheet_html(sheet, items))
        _write_atomic(os.path.join(tmp, "items.json"), json.dumps(
            {"sheet": sheet, "db": os.path.abspath(db), "items": items}, indent=1,
            ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"sheet": sheet, "items": len(items)}


_SHEET_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Feedback review {sheet}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1100px; }}
.item {{ border-top: 1px solid #ccc; padding: 1em 0; }}
pre {{ white-space: pre-wrap; word-wrap: break-word; background: #f6f6f6; padding: .6em;
       margin: .3em 0; }}
.cut {{ color: #b3261e; }}
.verdict label {{ margin-right: 1.5em; }}
</style></head><body>
<h1>Review feedback before it trains</h1>
<p>Each item is a correction or a problem report a user sent about a model reply. Approve it if
it is right and fit to train on, reject it otherwise. Your choices are kept in this browser;
when done, press <b>Download verdicts</b> and run
<code>python -m t5x_like.feedback verdicts --db=... --verdicts=&lt;the downloaded file&gt;</code>
(or fill the verdict column of sheet.csv and pass that).</p>
<p><button id="download-top">Download verdicts</button> <span id="status"></span></p>
{items}
<p><button id="download-bottom">Download verdicts</button></p>
<script>
const SHEET = "{sheet}";
const KEY = "t5x_like-feedback-review-" + SHEET;
const saved = JSON.parse(localStorage.getItem(KEY) || "{{}}");
function verdicts() {{
  const out = {{}};
  document.querySelectorAll(".item").forEach(div => {{
    const picked = div.querySelector("input[type=radio]:checked");
    const note = div.querySelector("textarea").value;
    if (picked || note) out[div.dataset.feedback] = {{verdict: picked ? picked.value : "", note}};
  }});
  return out;
}}
function update() {{
  const v = verdicts();
  localStorage.setItem(KEY, JSON.stringify(v));
  document.getElementById("status").textContent = Object.values(v).filter(x => x.verdict).length
    + " of " + document.querySelectorAll(".item").length + " decided";
}}
function download() {{
  const blob = new Blob([JSON.stringify({{sheet: SHEET, verdicts: verdicts()}}, null, 1)],
                        {{type: "application/json"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "verdicts-" + SHEET + ".json";
  a.click();
}}
document.getElementById("download-top").addEventListener("click", download);
document.getElementById("download-bottom").addEventListener("click", download);
document.querySelectorAll(".item").forEach(div => {{
  const v = saved[div.dataset.feedback];
  if (v) {{
    const input = div.querySelector("input[value='" + v.verdict + "']");
    if (input) input.checked = true;
    div.querySelector("textarea").value = v.note || "";
  }}
  div.addEventListener("change", update);
  div.addEventListener("input", update);
}});
update();
</script>
</body></html>
"""

_SHEET_ITEM = """<div class="item" data-feedback="{fid}">
<h3>Item {n}: {kind} <small>(feedback {fid}, reply {rid}/{index})</small></h3>
<b>Conversation</b><pre>{prompt}</pre>
<b>Model reply</b>{cut}<pre>{reply}</pre>
{correction}{problem}<div class="verdict">
<label><input type="radio" name="v{fid}" value="approve"{approve}> Approve</label>
<label><input type="radio" name="v{fid}" value="reject"{reject}> Reject</label>
</div>
<textarea rows="1" cols="80" placeholder="note (optional)"></textarea>
</div>"""


def _sheet_html(sheet: str, items: list[dict]) -> str:
    e = html.escape  # every text from the database is escaped: users wrote it
    body = "\n".join(_SHEET_ITEM.format(
        n=n, fid=it["feedback_id"], rid=e(it["response_id"]), index=it["index"],
        kind=e(it["kind"]), prompt=e(_prompt_text(it["prompt"])), reply=e(it["reply"]),
        cut=(' <span class="cut">(cut at max_tokens)</span>'
             if it["finish_reason"] == "length" else ""),
        correction=(f"<b>Correction</b><pre>{e(it['correction'])}</pre>\n"
                    if it["correction"] else ""),
        problem=f"<b>Report</b><pre>{e(it['problem'])}</pre>\n" if it["problem"] else "",
        approve=" checked" if it["verdict"] == "approve" else "",
        reject=" checked" if it["verdict"] == "reject" else "")
        for n, it in enumerate(items, start=1))
    return _SHEET_PAGE.format(sheet=sheet, items=body or "<p>Nothing to review.</p>")


def read_verdicts(path: str) -> list[tuple[int, str, str, str]]:
    """(feedback id, verdict, note, sheet) from a filled sheet.csv or a downloaded JSON."""
    if not os.path.isfile(path):
        raise UserError(f"verdicts file {path} does not exist.")
    raw = []  # (where, sheet, feedback id, verdict, note)
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); download it again from the "
                            "sheet.") from None
        if not isinstance(data, dict) or not isinstance(data.get("verdicts"), dict):
            raise UserError(f"{path}: expected {{\"sheet\": ..., \"verdicts\": {{feedback id: "
                            "...}}}} as the sheet's Download verdicts button writes.")
        for fid, v in data["verdicts"].items():
            v = v if isinstance(v, dict) else {"verdict": v}
            raw.append((f"{path}, feedback {fid}", str(data.get("sheet", "")), str(fid),
                        str(v.get("verdict", "")), str(v.get("note", "") or "")))
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"sheet", "feedback_id", "verdict"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{path}: no column {', '.join(sorted(missing))}; fill in the "
                                "sheet.csv that `review` wrote.")
            for lineno, r in enumerate(reader, start=2):
                raw.append((f"{path}, line {lineno}", r["sheet"] or "", r["feedback_id"] or "",
                            r["verdict"] or "", r.get("note") or ""))
    out = []
    for where, sheet, fid, verdict, note in raw:
        verdict = verdict.strip().lower()
        if not verdict:
            continue
        if verdict not in VERDICTS:
            raise UserError(f"{where}: verdict {verdict!r} is not approve, reject (or blank).")
        if not fid.strip().isdigit():
            raise UserError(f"{where}: feedback id {fid!r} is not a number.")
        out.append((int(fid), verdict, note, sheet))
    return out


def record_verdicts(db: str, path: str) -> dict:
    """Stores the verdicts of `path` in `db`; every one must name feedback that exists."""
    verdicts = read_verdicts(path)
    if not os.path.isfile(db):
        raise UserError(f"no feedback database at {db}.")
    store = Store(db)
    try:
        known = {r[0] for r in store._read("SELECT id FROM feedback")}
        unknown = sorted({fid for fid, *_ in verdicts} - known)
        if unknown:
            raise UserError(f"{path}: feedback {', '.join(map(str, unknown[:5]))} is not in "
                            f"{db}; give the database the sheet was written from.")
        sheets = {s for *_, s in verdicts if s}
        store.add_verdicts([(fid, v, note) for fid, v, note, _ in verdicts],
                           sheet=",".join(sorted(sheets)))
    finally:
        store.close()
    counts = collections.Counter(v for _, v, _, _ in verdicts)
    return {"approve": counts["approve"], "reject": counts["reject"]}


# -- the command line ---------------------------------------------------------------------------


def describe_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if k != "written")


def main_export(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    counts = export(f.db, f.out, f.format, reviewed_only=f.reviewed_only)
    which = " (reviewed only)" if f.reviewed_only else ""
    print(f"{f.format}{which}: wrote {counts['written']} records to {f.out} "
          f"({describe_counts(counts)})")
    sys.stdout.flush()


def main_review(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    made = write_review(f.db, f.out, include_reviewed=f.include_reviewed)
    print(f"wrote {f.out}/sheet.html and {f.out}/sheet.csv ({made['items']} items to "
          f"approve or reject). Then: python -m t5x_like.feedback verdicts --db={f.db} "
          "--verdicts=<downloaded verdicts .json or filled sheet.csv>")
    sys.stdout.flush()


def main_verdicts(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    done = record_verdicts(f.db, f.verdicts)
    print(f"recorded {done['approve']} approved and {done['reject']} rejected in {f.db}; "
          "`export --reviewed_only` now uses the approved ones.")
    sys.stdout.flush()
