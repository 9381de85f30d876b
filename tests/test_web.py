"""The web chat page in a real headless browser (Debian's chromium driven by selenium).

Send a message, thumbs up, report a problem with a correction, regenerate, continue: each
leaves its row in the feedback database. Needs /usr/bin/chromium and /usr/bin/chromedriver
(`apt-get install chromium chromium-driver`); .ci/run installs them, so CI always runs it.
Elsewhere, without them, it is skipped with the reason and the command to install them.
"""

import json
import os
import shutil
import sqlite3
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

import chat_model
from t5x_like.serving import feedback
from t5x_like.core import runs
from t5x_like.serving import server as serve

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "web-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = chat_model.make(str(tmp_path_factory.mktemp("model")))
    db = os.path.join(path, feedback.DB_NAME)
    app = serve.create_app(runs.load(path), db_path=db, api_key=KEY, model_name="tiny",
                           limits=serve.Limits(max_tokens_limit=12))
    with chat_model.serving(app) as url:
        yield url, db


@pytest.fixture(scope="module")
def browser():
    missing = [binary for binary in (CHROMIUM, CHROMEDRIVER) if not shutil.which(binary)]
    if missing:
        pytest.skip(f"no headless browser here ({', '.join(missing)} missing): apt-get install "
                    "-y chromium chromium-driver (Debian's; never a downloaded browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    # Both binaries given explicitly, so Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def rows(db, sql, args=()):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def wait_for_rows(db, sql, args=(), count=1, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        found = rows(db, sql, args)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def last_reply(driver, alts=1, timeout=240):
    """The last assistant turn once its reply (alternative number `alts`) has finished."""
    selector = f'.msg.assistant[data-done="1"][data-alts="{alts}"]'
    WebDriverWait(driver, timeout).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, selector)))
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_send_thumbs_up_report_regenerate_in_a_real_browser(server, browser):
    url, db = server
    browser.get(url + "/")
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("1.2")
    browser.find_element(By.ID, "input").send_keys("What is 2 + 3?")
    browser.find_element(By.ID, "send").click()

    reply = last_reply(browser)
    response_id = reply.get_attribute("data-response-id")
    [stored] = rows(db, "SELECT * FROM responses WHERE id = ?", (response_id,))
    assert reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == \
        stored["content"]
    assert browser.find_element(By.ID, "model-name").text == "tiny"

    # Thumbs up: the row is in the database.
    reply.find_element(By.CSS_SELECTOR, ".thumb-up").click()
    [row] = wait_for_rows(db, "SELECT * FROM feedback WHERE response_id = ?", (response_id,))
    assert row["rating"] == "up" and row["conversation_id"] == stored["conversation_id"]
    assert reply.find_element(By.CSS_SELECTOR, ".thumb-up").get_attribute("aria-pressed") == "true"

    # Report a problem, with a corrected reply.
    reply.find_element(By.CSS_SELECTOR, ".report").click()
    Select(reply.find_element(By.CSS_SELECTOR, ".problem-kind")).select_by_value("error")
    reply.find_element(By.CSS_SELECTOR, ".problem").send_keys("2 + 3 is not that")
    reply.find_element(By.CSS_SELECTOR, ".correction").send_keys("5")
    reply.find_element(By.CSS_SELECTOR, ".submit-report").click()
    reports = wait_for_rows(db, "SELECT * FROM feedback WHERE response_id = ? AND problem IS NOT "
                                "NULL", (response_id,))
    assert [(r["problem_kind"], r["problem"], r["correction"]) for r in reports] == [
        ("error", "2 + 3 is not that", "5")]

    # Regenerate: the alternative is stored, linked to the reply it replaces.
    reply.find_element(By.CSS_SELECTOR, ".regenerate").click()
    second = last_reply(browser, alts=2)
    second_id = second.get_attribute("data-response-id")
    assert second_id != response_id
    [alt] = rows(db, "SELECT * FROM responses WHERE id = ?", (second_id,))
    assert alt["regenerates_id"] == response_id
    assert alt["conversation_id"] == stored["conversation_id"]
    assert alt["prompt"] == stored["prompt"]

    # Continuing with the alternative on screen records it as the chosen one.
    browser.find_element(By.ID, "input").send_keys("And 4 + 4?")
    browser.find_element(By.ID, "send").click()
    chosen = wait_for_rows(db, "SELECT * FROM feedback WHERE response_id = ? AND chosen = 1",
                           (second_id,))
    assert len(chosen) == 1
    third = last_reply(browser)
    [follow] = rows(db, "SELECT * FROM responses WHERE id = ?",
                    (third.get_attribute("data-response-id"),))
    assert follow["conversation_id"] == stored["conversation_id"]
    assert json.loads(follow["prompt"]) == json.loads(stored["prompt"]) + [
        {"role": "assistant", "content": alt["content"]}, {"role": "user", "content": "And 4 + 4?"}]
    assert browser.find_element(By.ID, "status").text == ""
