"""A real browser (Debian chromium, driven by Playwright) logs in, labels pairwise and ranking
items with the keyboard, and an admin exports the preferences."""

from __future__ import annotations

import json
import os

import pytest
from sqlalchemy import select

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import Item, Label, Task, User
from rlhfkit.feedback.security import use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import add_member, create_task
from rlhfkit.feedback.testing import ServerThread

use_test_hasher()  # accounts are created per test; real Argon2 costs ~1 s each here

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("RLHFKIT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"
XSS_PROMPT = "Greet <script>window.__xss = 1</script> them"
XSS_RESPONSE = '<img src=x onerror="window.__xss = 2">hi'


@pytest.fixture
def server(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/install_browser_deps.sh")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    url = f"sqlite:///{tmp_path}/browser.db"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        create_user(s, "admin", PASSWORD, "admin")
        create_user(s, "ann", PASSWORD)
        pairs = create_task(s, "pairs", "pairwise", gold_rate=0.0)
        import_records(s, pairs, [{"prompt": XSS_PROMPT, "responses": [XSS_RESPONSE, "hello friend"]},
                                  {"prompt": "Say thanks", "responses": ["thanks a lot", "whatever"]}])
        ranks = create_task(s, "ranks", "ranking", gold_rate=0.0)
        import_records(s, ranks, [{"prompt": "Describe tea", "responses": ["lovely", "fine", "awful"]}])
    with ServerThread(create_app(db)) as srv:
        yield srv, db
    db.dispose()


def login(page, base, user):
    page.goto(f"{base}/login")
    page.fill("#username", user)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_load_state("domcontentloaded")


def test_label_with_keyboard_and_export(server, tmp_path):
    from playwright.sync_api import sync_playwright

    srv, db = server
    base = srv.url
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.set_default_timeout(15000)
            login(page, base, "ann")
            assert page.url == f"{base}/"

            # pairwise with the keyboard: "1" = left, then "2" = right
            page.click("text=pairs")
            shown = {}
            for key in ("1", "2"):
                page.wait_for_selector("#prompt")
                prompt = page.inner_text("#prompt")
                shown[prompt] = (key, [page.inner_text(f"#response-{i} pre") for i in range(2)])
                page.keyboard.press(key)
                page.wait_for_load_state("domcontentloaded")
            page.wait_for_selector("#done")
            # the untrusted text rendered as text and ran nothing
            assert XSS_PROMPT in shown and XSS_RESPONSE in shown[XSS_PROMPT][1]
            assert page.evaluate("typeof window.__xss") == "undefined"
            assert dialogs == []
            assert page.inner_text("#mine") == "2"

            # ranking: press 3, 1, 2 (display positions, best first), Backspace/undo once, Enter
            page.goto(f"{base}/")
            page.click("text=ranks")
            page.wait_for_selector("#ranking-view")
            order = [page.inner_text(f"#response-{i} pre") for i in range(3)]
            for key in ("3", "2", "Backspace", "1", "2"):
                page.keyboard.press(key)
            assert page.input_value("#ranking") == "2,0,1"
            page.keyboard.press("Enter")
            page.wait_for_selector("#done")

            # progress per annotator on the task list
            page.goto(f"{base}/")
            assert [c.inner_text() for c in page.query_selector_all("td.mine")] == ["2", "1"]

            with db.session() as s:
                labels = {lab.item_id: lab for lab in s.scalars(select(Label))}
                ranks_task = s.scalar(select(Task).where(Task.name == "ranks"))
                rank_label = next(lab for lab in labels.values() if lab.task_id == ranks_task.id)
                responses = ["lovely", "fine", "awful"]
                assert [responses[i] for i in rank_label.value["ranking"]] == [order[2], order[0], order[1]]
                pair_labels = [lab for lab in labels.values() if lab.task_id != ranks_task.id]
                assert len(pair_labels) == 2
                for lab in pair_labels:
                    key, _ = shown[s.get(Item, lab.item_id).prompt]
                    side = {"1": 0, "2": 1}[key]
                    # stored in original order: the response that sat on the pressed side
                    assert lab.value["choice"] == "ab"[lab.display_order[side]]

            # the admin sees the dashboard and downloads the preference export
            page.click("text=Log out")
            page.wait_for_load_state("domcontentloaded")
            login(page, base, "admin")
            assert page.url == f"{base}/admin"
            page.click("text=pairs")
            assert "Krippendorff" in page.content()
            with page.expect_download() as dl:
                page.click("#export-preferences")
            path = tmp_path / "export.jsonl"
            dl.value.save_as(str(path))
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            assert len(rows) == 2 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
            by_prompt = {r["prompt"]: r for r in rows}
            assert set(by_prompt) == set(shown)
            for prompt, (key, responses_shown) in shown.items():
                assert by_prompt[prompt]["chosen"] == responses_shown[int(key) - 1]
        finally:
            browser.close()


def test_scoped_task_list_correction_and_review_queue(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/install_browser_deps.sh")
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path}/scoped.db"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        create_user(s, "admin", PASSWORD, "admin")
        ann = create_user(s, "ann", PASSWORD)
        open_task = create_task(s, "open-pairs", "pairwise", gold_rate=0.0, randomize_order=False)
        import_records(s, open_task, [{"prompt": "Say thanks", "responses": ["thanks a lot", "whatever"]}])
        members = create_task(s, "team-pairs", "pairwise", gold_rate=0.0, open_to_all=False)
        add_member(s, members, ann)
        create_task(s, "secret-pairs", "pairwise", gold_rate=0.0, open_to_all=False)
    with ServerThread(create_app(db)) as srv, sync_playwright() as p:
        base = srv.url
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(15000)
            login(page, base, "ann")
            # role-scoped task list: open tasks and those she is a member of, nothing else
            assert [a.inner_text() for a in page.query_selector_all("a.task-link")] == ["open-pairs", "team-pairs"]
            page.click("text=open-pairs")
            page.wait_for_selector("#answer")
            page.wait_for_load_state("load")  # label.js listens for keys only once it has run
            page.keyboard.press("1")  # left = "thanks a lot" (file order)
            page.wait_for_selector("#done")
            # correction: My labels -> Correct -> choose the other response
            page.click("#my-labels")
            assert page.inner_text("td.version") == "1"
            page.click("a.correct")
            page.wait_for_selector("#correcting")
            page.click("#choose-right")
            page.wait_for_selector("#labels")
            assert page.inner_text("td.version") == "2"
            page.click("text=Log out")
            page.wait_for_load_state("domcontentloaded")

            # review queue: a rejection needs a reason; the annotator then reads it
            login(page, base, "admin")
            page.click("text=open-pairs")
            page.click("#review-link")
            page.wait_for_selector("section.review-item")
            # the pair side by side, the preferred one (B, "whatever", after the correction) marked
            assert page.inner_text("section.review-item .response.chosen pre") == "whatever"
            assert page.inner_text("section.review-item .answer") == "B is better"
            page.click("button.reject")
            page.wait_for_selector("#error")
            assert "reason" in page.inner_text("#error")
            page.fill("input[name=reason]", "B is dismissive")
            page.click("button.reject")
            page.wait_for_selector("#queue-empty")
            page.click("text=Log out")
            page.wait_for_load_state("domcontentloaded")
            login(page, base, "ann")
            page.click("#my-labels")
            assert page.inner_text("td.review") == "rejected: B is dismissive"
            assert page.query_selector("a.correct") is None  # reviewed labels no longer change
        finally:
            browser.close()
    with db.read_session() as s:
        lab = s.scalar(select(Label))
        assert lab.value == {"choice": "b"} and lab.version == 2 and lab.review_status == "rejected"
    db.dispose()


def test_review_page_side_by_side_filters_and_bulk_accept(tmp_path):
    """Annotators answer with a strength and a comment, or skip; the admin's review page shows
    each pair side by side with the preferred response marked, filters by annotator, and
    accepts a selection at once. A screenshot of the page goes to $RLHFKIT_REVIEW_SHOT."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/install_browser_deps.sh")
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path}/review.db"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        create_user(s, "admin", PASSWORD, "admin")
        create_user(s, "ann", PASSWORD)
        create_user(s, "ben", PASSWORD)
        task = create_task(s, "kindness", "pairwise", gold_rate=0.0, randomize_order=False, overlap=2)
        import_records(s, task, [
            {"prompt": "My cat died yesterday.", "responses": ["Cats die all the time.",
                                                               "I'm so sorry. Losing a companion hurts."]},
            {"prompt": "Can you help me with my essay?", "responses": ["Sure! What is it about?", "No."]},
            {"prompt": "Is this question stupid?", "responses": ["There are no stupid questions.", "Yes."]}])
    with ServerThread(create_app(db)) as srv, sync_playwright() as p:
        base = srv.url
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.set_default_timeout(15000)
            for who, picks in (("ann", ("right", "left", "left")), ("ben", ("skip", "right", "right"))):
                login(page, base, who)
                page.click("text=kindness")
                for choice in picks:
                    page.wait_for_selector("#answer")
                    page.wait_for_load_state("load")
                    if choice == "skip":
                        page.click("#skip")
                        continue
                    page.check("input[name=strength][value=much]" if choice == "right" else
                               "input[name=strength][value=slightly]")
                    if who == "ann" and choice == "right":
                        page.fill("#comment", "A is callous")
                    page.click(f"#choose-{choice}")
                page.click("text=Log out")
                page.wait_for_load_state("domcontentloaded")

            login(page, base, "admin")
            page.goto(f"{base}/admin/tasks/{task.id}/review")
            page.wait_for_selector("section.review-item")
            assert len(page.query_selector_all("section.review-item")) == 5
            first = page.query_selector("section.review-item")  # ann's first answer: B, much better
            articles = first.query_selector_all(".response")
            assert ["chosen" in a.get_attribute("class") for a in articles] == [False, True]
            assert first.query_selector(".answer").inner_text() == "B is much better"
            assert "A is callous" in first.inner_text()
            boxes = page.query_selector_all(".response")
            left, right = boxes[0].bounding_box(), boxes[1].bounding_box()
            assert abs(left["y"] - right["y"]) < 2 and right["x"] > left["x"] + left["width"]  # side by side
            page.screenshot(path=os.environ.get("RLHFKIT_REVIEW_SHOT", str(tmp_path / "review.png")), full_page=True)

            page.select_option("#filter-annotator", "ben")
            page.click("form.filters button")
            page.wait_for_selector("#queue-count")
            assert len(page.query_selector_all("section.review-item")) == 2
            for box in page.query_selector_all("input[name=label_id]"):
                box.check()
            page.click("#accept-selected")
            page.wait_for_selector("#notice")
            assert page.inner_text("#notice") == "Accepted 2 label(s)."
            assert page.query_selector("#queue-empty") is not None
        finally:
            browser.close()
    with db.read_session() as s:
        states = sorted((name, lab.review_status, lab.strength) for lab, name in
                        s.execute(select(Label, User.username).join(User, User.id == Label.user_id)))
    db.dispose()
    assert states == [("ann", "pending", "much"), ("ann", "pending", "slightly"), ("ann", "pending", "slightly"),
                      ("ben", "accepted", "much"), ("ben", "accepted", "much")]
