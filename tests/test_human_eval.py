"""Side-by-side review: the sheet is blinded, and ratings map back to the right models."""

import csv
import json
import os

import pytest
from scipy import stats

from t5x_like.evaluation import human_eval
from t5x_like.core.errors import UserError

N = 24


def make_sheet(tmp_path, seed=7):
    prompts = [[{"role": "user", "content": f"Question {i} <b>&</b>?"}] for i in range(N)]
    replies_a = [f"alpha reply {i}" for i in range(N)]
    replies_b = [f"beta reply {i}" for i in range(N)]
    out = str(tmp_path / "sheet")
    key = human_eval.write_sheet(out, prompts, replies_a, replies_b,
                                 models=("runs/alpha step 40", "runs/beta step 40"), seed=seed)
    return out, key


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def fill_csv(out, choose, path):
    """A rater: picks per row by reading only the texts shown (choose(text1, text2) -> choice)."""
    with open(os.path.join(out, "sheet.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["choice"] = choose(r["response_1"], r["response_2"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_sheet_is_blinded_and_shuffled(tmp_path):
    out, key = make_sheet(tmp_path)
    assert sorted(os.listdir(out)) == ["key.json", "sheet.csv", "sheet.html"]
    page = read(os.path.join(out, "sheet.html"))
    table = read(os.path.join(out, "sheet.csv"))
    for text in (page, table):
        assert "alpha" not in text.replace("alpha reply", "") and "runs/" not in text
    assert "Question 3 &lt;b&gt;&amp;&lt;/b&gt;?" in page  # model text is escaped in the page
    assert page.count('type="radio"') == 3 * N and key["sheet_id"] in page
    sides = [r["response_1_model"] for r in key["rows"]]
    assert 0 < sides.count("A") < N  # which side is which varies per row
    assert [r["prompt_index"] for r in key["rows"]] != list(range(N))  # rows are shuffled
    assert sorted(r["prompt_index"] for r in key["rows"]) == list(range(N))
    # The same seed gives the same sheet; a sheet is never overwritten.
    _, again = make_sheet(tmp_path / "again")
    assert again["rows"] == key["rows"]
    with pytest.raises(UserError, match="already exists"):
        make_sheet(tmp_path)


def test_filled_csv_maps_back_to_models_pairs_and_win_rate(tmp_path):
    out, _ = make_sheet(tmp_path)
    # The rater prefers alpha on even questions, beta on odd ones, except ties on multiples
    # of 3, and skips question 23.
    def choose(t1, t2):
        i = int(t1.rsplit(" ", 1)[1])
        if i == 23:
            return ""
        if i % 3 == 0:
            return "tie"
        want = "alpha" if i % 2 == 0 else "beta"
        return "1" if t1.startswith(want) else "2"

    fill_csv(out, choose, tmp_path / "filled.csv")
    summary = human_eval.score_sheet(out, [str(tmp_path / "filled.csv")])
    rated = [i for i in range(N) if i != 23]
    ties = [i for i in rated if i % 3 == 0]
    alpha = [i for i in rated if i % 3 and i % 2 == 0]
    beta = [i for i in rated if i % 3 and i % 2]
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (len(alpha), len(beta),
                                                                       len(ties))
    ci = stats.binomtest(len(alpha), len(alpha) + len(beta)).proportion_ci(0.95, method="wilson")
    assert summary["win_rate_a"] == pytest.approx(len(alpha) / (len(alpha) + len(beta)))
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert summary["win_rate_a_ties_half"] == pytest.approx((len(alpha) + len(ties) / 2) / len(rated))
    assert summary["models"] == {"A": "runs/alpha step 40", "B": "runs/beta step 40"}
    with open(os.path.join(out, "preferences.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == len(alpha) + len(beta)
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        i = int(p["chosen"].rsplit(" ", 1)[1])
        assert p["prompt"] == [{"role": "user", "content": f"Question {i} <b>&</b>?"}]
        winner, loser = ("alpha", "beta") if i in alpha else ("beta", "alpha")
        assert p["chosen"] == f"{winner} reply {i}" and p["rejected"] == f"{loser} reply {i}"
    assert json.loads(read(os.path.join(out, "ratings.json")))["wins_a"] == len(alpha)


def test_page_export_json_and_several_raters(tmp_path):
    out, key = make_sheet(tmp_path)
    # What the page's Download button writes: {"sheet", "ratings": {row: {choice, comment}}}.
    always_beta = {str(r["row"]): {"choice": "2" if r["response_1_model"] == "A" else "1",
                                   "comment": ""} for r in key["rows"]}
    (tmp_path / "r1.json").write_text(json.dumps({"sheet": key["sheet_id"],
                                                  "ratings": always_beta}))
    fill_csv(out, lambda t1, t2: "1" if t1.startswith("alpha") else "2", tmp_path / "r2.csv")
    summary = human_eval.score_sheet(out, [str(tmp_path / "r1.json"), str(tmp_path / "r2.csv")])
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (N, N, 0)
    assert summary["win_rate_a"] == 0.5
    lines = read(os.path.join(out, "preferences.jsonl")).splitlines()
    assert len(lines) == 2 * N


def test_bad_ratings_are_refused(tmp_path):
    out, _ = make_sheet(tmp_path)
    rows = fill_csv(out, lambda t1, t2: "maybe" if t1.endswith(" 5") else "1",
                    tmp_path / "bad.csv")
    line = 2 + next(i for i, r in enumerate(rows) if r["response_1"].endswith(" 5"))
    with pytest.raises(UserError, match=rf"bad.csv, line {line}: choice 'maybe' is not one of"):
        human_eval.score_sheet(out, [str(tmp_path / "bad.csv")])
    (tmp_path / "other.json").write_text(json.dumps({"sheet": "0000", "ratings": {"1": "1"}}))
    with pytest.raises(UserError, match="belongs to sheet '0000'"):
        human_eval.score_sheet(out, [str(tmp_path / "other.json")])
    fill_csv(out, lambda t1, t2: "", tmp_path / "empty.csv")
    with pytest.raises(UserError, match="no row has a choice yet"):
        human_eval.score_sheet(out, [str(tmp_path / "empty.csv")])
    with pytest.raises(UserError, match="does not exist"):
        human_eval.score_sheet(out, [str(tmp_path / "missing.csv")])


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("Hello there\n\nWhat is 2 + 3?\n")
    assert human_eval.read_prompts(str(tmp_path / "p.txt")) == [
        [{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "What is 2 + 3?"}]]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]})
        + "\n{oops\n")
    with pytest.raises(UserError, match=r"p.jsonl, line 3: not valid JSON"):
        human_eval.read_prompts(str(tmp_path / "p.jsonl"))


def test_win_rate_without_decisive_ratings():
    assert human_eval.win_rate(0, 0, 3)["win_rate_a"] is None
    got = human_eval.win_rate(7, 3, 0)
    ci = stats.binomtest(7, 10).proportion_ci(0.95, method="wilson")
    assert got["win_rate_a"] == 0.7 and got["ci_low"] == pytest.approx(ci.low)
