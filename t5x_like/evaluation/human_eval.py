"""Side-by-side human review of two models: a blinded sheet out, preference pairs and a win
rate back.

    python -m t5x_like.evaluate compare runs/a runs/b --prompts=prompts.jsonl --out=review
        -> review/sheet.html   one row per prompt: the two replies as "Response 1" and
                               "Response 2", a choice per row, a button that downloads the
                               ratings as JSON (progress is kept in the browser meanwhile)
           review/sheet.csv    the same rows for a spreadsheet; fill the "choice" column
           review/key.json     which model wrote which response: keep it from the raters
    python -m t5x_like.evaluate ratings review --ratings=sheet.csv[,ratings.json,...]
        -> review/preferences.jsonl   {"prompt": [messages], "chosen": str, "rejected": str}
           review/ratings.json        wins, ties, win rate of A with a 95% confidence interval

Blinding: rows are shuffled and, per row, a coin decides which model's reply is Response 1;
both come from a seeded generator, written down only in key.json. A choice is "1", "2" or
"tie" (blank = not rated). The win rate of A is over decisive ratings (ties left out) with a
Wilson score interval (scipy); `win_rate_a_ties_half` counts a tie as half a win.
"""

import csv
import html
import io
import json
import os
import random
import secrets

from data_pipelines import chat_template, sources
from t5x_like.core import files
from t5x_like.core.errors import UserError

CHOICES = ("1", "2", "tie")


# ---------------------------------------------------------------------------------------------
# Prompts.


def read_prompts(path: str) -> list[list[dict]]:
    """Prompts as conversations: a .jsonl of {"prompt": str or [messages]} (or {"messages"}),
    or any other file with one prompt per line."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts={path} does not exist.")
    if not path.endswith((".jsonl", ".jsonl.gz")):
        prompts = [[{"role": "user", "content": line}] for _, line in sources.iter_lines(path)
                   if line.strip()]
    else:
        prompts = [_prompt(record, path, lineno) for lineno, record in sources.json_lines(path)]
    if not prompts:
        raise UserError(f"--prompts={path} holds no prompts.")
    return prompts


def _prompt(record, path: str, lineno: int) -> list[dict]:
    prompt = record.get("prompt", record.get("messages")) if isinstance(record, dict) else None
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    try:
        chat_template.check(prompt if isinstance(prompt, list) else [])
    except chat_template.TemplateError as e:
        raise UserError(f"{path}, line {lineno}: needs 'prompt' (a string or a list of "
                        f"{{\"role\", \"content\"}} messages): {e}.") from None
    return prompt


# ---------------------------------------------------------------------------------------------
# The sheet.


def write_sheet(out_dir: str, prompts: list[list[dict]], replies_a: list[str],
                replies_b: list[str], *, models: tuple[str, str], seed: int | None = None
                ) -> dict:
    """Writes sheet.html, sheet.csv and key.json into the new folder `out_dir`; returns the key.

    The folder is built under a temporary name and renamed, and never overwritten (a key and
    ratings of different sheets must not mix).
    """
    if not len(prompts) == len(replies_a) == len(replies_b):
        raise ValueError("one reply per prompt from each model")
    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} already exists; choose a new --out (a sheet is never "
                        "overwritten, so ratings always match their key).")
    seed = secrets.randbits(32) if seed is None else seed
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    sheet_id = f"{rng.getrandbits(48):012x}"
    rows = []
    for row, i in enumerate(order, start=1):
        a_first = rng.random() < 0.5
        first, second = (replies_a[i], replies_b[i]) if a_first else (replies_b[i], replies_a[i])
        rows.append({"row": row, "prompt_index": i, "prompt": prompts[i],
                     "response_1": first, "response_2": second,
                     "response_1_model": "A" if a_first else "B"})
    key = {"sheet_id": sheet_id, "seed": seed, "models": {"A": models[0], "B": models[1]},
           "rows": rows}
    with files.atomic_dir(out_dir) as tmp:
        files.atomic_write_json(os.path.join(tmp, "key.json"), key, ensure_ascii=False)
        files.atomic_write_text(os.path.join(tmp, "sheet.csv"), _csv(sheet_id, rows))
        files.atomic_write_text(os.path.join(tmp, "sheet.html"), _html(sheet_id, rows))
    return key


def _prompt_text(messages: list[dict]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _csv(sheet_id: str, rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sheet", "row", "prompt", "response_1", "response_2", "choice", "comment"])
    for r in rows:
        writer.writerow([sheet_id, r["row"], _prompt_text(r["prompt"]), r["response_1"],
                         r["response_2"], "", ""])
    return buffer.getvalue()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Side-by-side review {sheet_id}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
.row {{ border-top: 1px solid #ccc; padding: 1em 0; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .6em; margin: .3em 0; }}
.choice label {{ margin-right: 1.5em; }}
#status {{ font-weight: bold; }}
</style></head><body>
<h1>Which response is better?</h1>
<p>For each prompt, read both responses and choose the better one, or "tie" if neither is
better. The models are hidden and their order changes from row to row. Your choices are kept
in this browser; when done, press <b>Download ratings</b> and send the file back.</p>
<p><button onclick="download()">Download ratings</button> <span id="status"></span></p>
{rows}
<p><button onclick="download()">Download ratings</button></p>
<script>
const SHEET = "{sheet_id}";
const KEY = "t5x_like-review-" + SHEET;
const saved = JSON.parse(localStorage.getItem(KEY) || "{{}}");
function ratings() {{
  const out = {{}};
  document.querySelectorAll(".row").forEach(div => {{
    const row = div.dataset.row;
    const picked = div.querySelector("input[type=radio]:checked");
    const comment = div.querySelector("textarea").value;
    if (picked || comment) out[row] = {{choice: picked ? picked.value : "", comment: comment}};
  }});
  return out;
}}
function update() {{
  const r = ratings();
  localStorage.setItem(KEY, JSON.stringify(r));
  const done = Object.values(r).filter(x => x.choice).length;
  document.getElementById("status").textContent =
    done + " of " + document.querySelectorAll(".row").length + " rated";
}}
function download() {{
  const blob = new Blob([JSON.stringify({{sheet: SHEET, ratings: ratings()}}, null, 1)],
                        {{type: "application/json"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "ratings-" + SHEET + ".json";
  a.click();
}}
document.querySelectorAll(".row").forEach(div => {{
  const r = saved[div.dataset.row];
  if (r) {{
    const input = div.querySelector("input[value='" + r.choice + "']");
    if (input) input.checked = true;
    div.querySelector("textarea").value = r.comment || "";
  }}
  div.addEventListener("change", update);
  div.addEventListener("input", update);
}});
update();
</script>
</body></html>
"""

_ROW = """<div class="row" data-row="{row}">
<h3>Prompt {row}</h3><pre>{prompt}</pre>
<div class="pair"><div><b>Response 1</b><pre>{r1}</pre></div><div><b>Response 2</b><pre>{r2}</pre></div></div>
<div class="choice">
<label><input type="radio" name="c{row}" value="1"> Response 1 is better</label>
<label><input type="radio" name="c{row}" value="tie"> Tie</label>
<label><input type="radio" name="c{row}" value="2"> Response 2 is better</label>
</div>
<textarea rows="1" cols="80" placeholder="comment (optional)"></textarea>
</div>"""


def _html(sheet_id: str, rows: list[dict]) -> str:
    body = "\n".join(_ROW.format(row=r["row"], prompt=html.escape(_prompt_text(r["prompt"])),
                                 r1=html.escape(r["response_1"]), r2=html.escape(r["response_2"]))
                     for r in rows)
    return _PAGE.format(sheet_id=sheet_id, rows=body)


# ---------------------------------------------------------------------------------------------
# Reading ratings back.


def load_key(sheet_dir: str) -> dict:
    path = os.path.join(sheet_dir, "key.json")
    if not os.path.isfile(path):
        raise UserError(f"{sheet_dir} has no key.json; give the folder `compare` wrote.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_ratings(path: str, sheet_id: str) -> dict[int, str]:
    """{row: "1" | "2" | "tie"} from a filled sheet.csv or a downloaded ratings JSON."""
    if not os.path.isfile(path):
        raise UserError(f"ratings file {path} does not exist.")
    raw: list[tuple[str, str, str, str]] = []  # (where, sheet, row, choice)
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); export it again from the page.")
        if not isinstance(data, dict) or not isinstance(data.get("ratings"), dict):
            raise UserError(f"{path}: expected {{\"sheet\": ..., \"ratings\": {{row: ...}}}} as "
                            "the sheet's Download ratings button writes.")
        for row, value in data["ratings"].items():
            choice = value.get("choice", "") if isinstance(value, dict) else value
            raw.append((f"{path}, row {row}", str(data.get("sheet", "")), str(row), str(choice)))
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"sheet", "row", "choice"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{path}: no column {', '.join(sorted(missing))}; fill in the "
                                "sheet.csv that compare wrote.")
            for lineno, r in enumerate(reader, start=2):
                raw.append((f"{path}, line {lineno}", r["sheet"] or "", r["row"] or "",
                            r["choice"] or ""))
    out: dict[int, str] = {}
    for where, sheet, row, choice in raw:
        if sheet != sheet_id:
            raise UserError(f"{where}: belongs to sheet {sheet!r}, not {sheet_id!r}; give the "
                            "ratings of this sheet's folder.")
        choice = choice.strip().lower()
        if not choice:
            continue
        if choice not in CHOICES:
            raise UserError(f"{where}: choice {choice!r} is not one of 1, 2, tie (or blank).")
        if not row.strip().isdigit():
            raise UserError(f"{where}: row {row!r} is not a row number.")
        out[int(row)] = choice
    return out


def preferences(key: dict, ratings: list[dict[int, str]]) -> tuple[list[dict], dict]:
    """Ratings (one dict per rater) -> preference pairs and the win-rate summary."""
    rows = {r["row"]: r for r in key["rows"]}
    pairs, per_row = [], []
    wins = {"A": 0, "B": 0}
    ties = 0
    for rater, rated in enumerate(ratings):
        for row, choice in sorted(rated.items()):
            if row not in rows:
                raise UserError(f"rating for row {row}, which the sheet does not have "
                                f"(rows 1-{len(rows)}).")
            r = rows[row]
            first = r["response_1_model"]
            second = "B" if first == "A" else "A"
            if choice == "tie":
                ties += 1
                winner = None
            else:
                winner = first if choice == "1" else second
                wins[winner] += 1
                chosen, rejected = ((r["response_1"], r["response_2"]) if choice == "1"
                                    else (r["response_2"], r["response_1"]))
                pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
            per_row.append({"rater": rater, "row": row, "prompt_index": r["prompt_index"],
                            "choice": choice, "winner": winner})
    summary = {"models": key["models"], **win_rate(wins["A"], wins["B"], ties),
               "ratings": per_row}
    return pairs, summary


def win_rate(wins_a: int, wins_b: int, ties: int, confidence: float = 0.95) -> dict:
    """A's share of decisive ratings with a Wilson score interval; ties as half wins too."""
    from scipy import stats

    decisive = wins_a + wins_b
    total = decisive + ties
    out = {"wins_a": wins_a, "wins_b": wins_b, "ties": ties, "rated": total,
           "win_rate_a": wins_a / decisive if decisive else None,
           "ci_low": None, "ci_high": None, "confidence": confidence,
           "win_rate_a_ties_half": (wins_a + ties / 2) / total if total else None}
    if decisive:
        interval = stats.binomtest(wins_a, decisive).proportion_ci(confidence, method="wilson")
        out["ci_low"], out["ci_high"] = float(interval.low), float(interval.high)
    return out


def score_sheet(sheet_dir: str, ratings_paths: list[str]) -> dict:
    """Reads the ratings files of `sheet_dir`'s sheet; writes preferences.jsonl and
    ratings.json there; returns the summary."""
    key = load_key(sheet_dir)
    rated = [read_ratings(p, key["sheet_id"]) for p in ratings_paths]
    pairs, summary = preferences(key, rated)
    if not summary["rated"]:
        raise UserError(f"{', '.join(ratings_paths)}: no row has a choice yet; fill in 1, 2 or "
                        "tie in the choice column (or on the page).")
    files.atomic_write_jsonl(os.path.join(sheet_dir, "preferences.jsonl"), pairs,
                             ensure_ascii=False)
    summary["sources"] = [os.path.abspath(p) for p in ratings_paths]
    files.atomic_write_json(os.path.join(sheet_dir, "ratings.json"), summary, ensure_ascii=False)
    return summary


def describe(summary: dict) -> str:
    """One paragraph for the terminal."""
    a, b = summary["models"]["A"], summary["models"]["B"]
    head = (f"A = {a}\nB = {b}\n{summary['rated']} ratings: A wins {summary['wins_a']}, "
            f"B wins {summary['wins_b']}, ties {summary['ties']}")
    if summary["win_rate_a"] is None:
        return head + "\nno decisive ratings: no win rate."
    return (head + f"\nwin rate of A (decisive ratings): {summary['win_rate_a']:.3f} "
            f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}] "
            f"({summary['confidence']:.0%} Wilson interval); ties as half wins: "
            f"{summary['win_rate_a_ties_half']:.3f}")
