"""The annotation page in a real browser (headless chromium) against the real app: the queue, keyboard
and mouse editing, offsets with emoji, combining marks and right-to-left text, idempotent submits,
API errors in words, and API keys."""
from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

# texts the small test model knows (tests/synthetic.py): names, places, organisations
TEXTS = [
    "Anna Berg visited Paris .",
    "Maria Lopez works for Acme Corp in Buenos Aires .",
    "the office of Globex is in Oslo .",
]


# ---------------------------------------------------------------- helpers


def wait(driver, condition, timeout: float = 30, message: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(f"timed out waiting for {message or condition}; page error box: {error!r}") from None


def state(driver) -> dict:
    return driver.execute_script(
        "const s = window.nerAnnotate.state, it = s.item;"
        "return {labels: s.labels, busy: s.busy, caret: s.caret, anchor: s.anchor,"
        " fresh_ms: performance.now() - s.shownAt,"
        " item: it && {kind: it.kind, text: it.text, prediction_id: it.predictionId,"
        "   entities: it.entities.map(r => ({start: it.tokens[r.s].start, end: it.tokens[r.e - 1].end, label: r.label}))}}"
    )


def open_page(driver, app, expect_item: bool = True) -> dict:
    driver.get(app.url + "/annotate")
    return ready(driver, expect_item)


def ready(driver, expect_item: bool = True) -> dict:
    """Waits until the page shows a text, is idle, and the text is old enough to be submitted."""
    def check(d):
        if not d.execute_script("return !!(window.nerAnnotate && window.nerAnnotate.state.labels.length)"):
            return False
        s = state(d)
        if s["busy"] or (expect_item and (s["item"] is None or s["fresh_ms"] < 450)):
            return False
        return s

    return wait(driver, check, message="the page to show a text")


def press(driver, *keys: str) -> None:
    ActionChains(driver).send_keys(*keys).perform()


def digit(driver, label: str) -> str:
    return str(state(driver)["labels"].index(label) + 1)


def spans(text: str, entities: list[dict]) -> list[tuple[str, str]]:
    return [(text[e["start"] : e["end"]], e["label"]) for e in entities]


def submit_and_wait_for_next(driver, before: int) -> None:
    press(driver, Keys.ENTER)
    wait(driver, lambda d: int(d.find_element(By.ID, "sitting").text) == before + 1, message="the submit to be counted")


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Saved in the test's folder; NER_ANNOTATE_SCREENSHOT=path also keeps a copy (how docs/annotate.png is made)."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the browser took no screenshot"
    keep = os.environ.get("NER_ANNOTATE_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(path.read_bytes())
    return path


# ---------------------------------------------------------------- tests


def test_page_shows_the_least_confident_text_with_its_predictions(browser, serve, tmp_path):
    with serve() as app:
        app.tag(*TEXTS)
        first = app.queue()[0]  # least confident first
        s = open_page(browser, app)
        assert s["item"]["kind"] == "queue" and s["item"]["prediction_id"] == first["prediction_id"]
        assert browser.find_element(By.ID, "doc").text == first["text"]
        shown = [(e.text.strip(), e.get_attribute("data-label")) for e in browser.find_elements(By.CSS_SELECTOR, "#doc .ent")]
        assert shown == spans(first["text"], first["entities"]) and shown
        # one colour per label
        colours: dict[str, set[str]] = {}
        for e in browser.find_elements(By.CSS_SELECTOR, "#doc .ent"):
            colours.setdefault(e.get_attribute("data-label"), set()).add(e.value_of_css_property("background-color"))
        assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == len(colours)
        assert "small 1.0.0" in browser.find_element(By.ID, "model").text
        assert "small 1.0.0" in browser.find_element(By.ID, "source").text
        assert browser.find_element(By.ID, "total").text == "0" and browser.find_element(By.ID, "queued").text == "3"
        assert browser.find_element(By.ID, "export").get_attribute("href").endswith("/annotations?format=jsonl")
        keys = browser.find_element(By.ID, "keys")
        assert keys.is_displayed() and all(k in keys.text for k in ("Enter", "Delete", "Shift", "undo", "skip"))
        # a mouse selection in progress makes the screenshot show every state of the page
        toks = browser.find_elements(By.CSS_SELECTOR, "#doc .tok")
        ActionChains(browser).click(toks[1]).key_down(Keys.SHIFT).send_keys(Keys.ARROW_RIGHT).key_up(Keys.SHIFT).perform()
        words = first["text"].split()
        assert f"Selected “{words[1]} {words[2]}”" in browser.find_element(By.ID, "hint").text
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#doc .tok.sel")] == words[1:3]
        shot = screenshot(browser, tmp_path, "annotate.png")
        assert shot.stat().st_size > 10_000  # a real rendering, not a blank page


def test_correct_a_prediction_with_the_keyboard_only(browser, serve):
    with serve() as app:
        app.tag(TEXTS[0])
        s = open_page(browser, app)
        text = s["item"]["text"]
        assert spans(text, s["item"]["entities"]) == [("Anna Berg", "PER"), ("Paris", "LOC")]
        assert s["anchor"] is not None  # the page starts on the first entity
        press(browser, Keys.DELETE)  # remove "Anna Berg"
        press(browser, Keys.HOME, digit(browser, "LOC"))  # "Anna" alone becomes LOC
        press(browser, Keys.ARROW_DOWN, digit(browser, "ORG"))  # next entity: "Paris" relabelled ORG
        press(browser, "z")  # undo: Paris is LOC again
        assert spans(text, state(browser)["item"]["entities"]) == [("Anna", "LOC"), ("Paris", "LOC")]
        # Shift+arrows extend a selection: "visited Paris" as one ORG, replacing "Paris"
        press(browser, Keys.HOME, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ARROW_RIGHT).key_up(Keys.SHIFT).perform()
        press(browser, digit(browser, "ORG"))
        expected = [("Anna", "LOC"), ("visited Paris", "ORG")]
        assert spans(text, state(browser)["item"]["entities"]) == expected
        submit_and_wait_for_next(browser, 0)
        (stored,) = app.annotations()
        assert stored["text"] == text and spans(text, stored["entities"]) == expected
        assert stored["meta"]["prediction_id"] == s["item"]["prediction_id"] and stored["meta"]["source"] == "prediction"
        wait(browser, lambda d: d.find_element(By.ID, "total").text == "1", message="the total to count the correction")
        assert "queue is empty" in browser.find_element(By.ID, "source").text


def test_click_an_entity_to_relabel_or_remove_it_and_skip_a_text(browser, serve):
    with serve() as app:
        # two texts with the same entities (the queue offers each text once, least confident first)
        app.tag(TEXTS[0])
        app.tag(TEXTS[0].replace(" .", " again ."))
        queue = app.queue()
        first, second = (q["prediction_id"] for q in queue)
        second_text = queue[1]["text"]
        assert open_page(browser, app)["item"]["prediction_id"] == first
        press(browser, "s")
        wait(browser, lambda d: state(d)["item"]["prediction_id"] == second, message="the skip")
        ready(browser)

        def entity(text):
            return next(e for e in browser.find_elements(By.CSS_SELECTOR, "#doc .ent") if e.text.strip() == text)

        entity("Paris").click()
        assert "Entity “Paris” LOC" in browser.find_element(By.ID, "hint").text
        browser.find_element(By.CSS_SELECTOR, "#labels button[data-label='ORG']").click()
        entity("Anna Berg").click()
        browser.find_element(By.ID, "remove").click()
        assert spans(second_text, state(browser)["item"]["entities"]) == [("Paris", "ORG")]
        browser.find_element(By.ID, "undo").click()
        assert spans(second_text, state(browser)["item"]["entities"]) == [("Anna Berg", "PER"), ("Paris", "ORG")]
        entity("Anna Berg").click()
        browser.find_element(By.ID, "remove").click()
        browser.find_element(By.ID, "submit").click()
        wait(browser, lambda d: d.find_element(By.ID, "sitting").text == "1", message="the submit")
        (stored,) = app.annotations()
        assert spans(stored["text"], stored["entities"]) == [("Paris", "ORG")]
        # the skipped text is not corrected and stays queued; it comes back once only skipped ones are left
        assert [q["prediction_id"] for q in app.queue()] == [first]
        wait(browser, lambda d: "Only skipped texts" in d.find_element(By.ID, "source").text, message="the queue's end")
        press(browser, "s")
        wait(browser, lambda d: (st := state(d))["item"] is not None and st["item"]["prediction_id"] == first, message="the skipped text")


def _drag(driver, start_el, start_frac: float, end_el, end_frac: float) -> None:
    """A real mouse drag from a point inside one element to a point inside another (fractions of their width)."""
    def offset(el, frac):
        return int(el.rect["width"] * (frac - 0.5)), 0  # selenium offsets are from the element's centre

    ActionChains(driver).move_to_element_with_offset(start_el, *offset(start_el, start_frac)).click_and_hold().pause(0.1) \
        .move_to_element_with_offset(end_el, *offset(end_el, end_frac)).pause(0.1).release().perform()


def test_mouse_selection_over_emoji_snaps_to_tokens_with_exact_offsets(browser, serve):
    # surrogate pairs (😀, the flag, the skin tone), a combining diaeresis (Zu\u0308rich) and a ZWJ family
    # and a token with astral letters inside (𝕏𝕏Z stays one token)
    text = "😀👍🏽 Olga visited Kyoto 🇯🇵 and Zu\u0308rich 👩\u200d👩\u200d👧 𝕏𝕏Z news ."
    with serve() as app:
        app.tag(text)
        (predicted,) = app.queue()
        s = open_page(browser, app)
        assert s["item"]["text"] == text
        # spaCy makes each emoji code point a token; whatever the small model made of them is shown as predicted
        assert s["item"]["entities"] == [{k: e[k] for k in ("start", "end", "label")} for e in predicted["entities"]]
        assert [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, "#doc .ent")] == [e["text"] for e in predicted["entities"]]
        toks = {t.text: t for t in browser.find_elements(By.CSS_SELECTOR, "#doc .tok")}
        # from the middle of "Kyoto" to the middle of "Zürich": whole tokens are taken
        _drag(browser, toks["Kyoto"], 0.5, toks["Zu\u0308rich"], 0.4)
        sel = state(browser)
        assert sel["anchor"] is not None and sel["anchor"] != sel["caret"]
        hint = browser.find_element(By.ID, "hint").text
        assert "Kyoto 🇯🇵 and Zu\u0308rich" in hint
        press(browser, digit(browser, "LOC"))
        entities = state(browser)["item"]["entities"]
        start, end = text.index("Kyoto"), text.index("rich") + len("rich")
        assert {"start": start, "end": end, "label": "LOC"} in entities  # Python code point offsets
        # from between "𝕏𝕏" and "Z", where the UTF-16 offset (4) runs ahead of the code point offset (2):
        # counted in UTF-16 units the start would fall past the token and miss it
        toks = {t.text: t for t in browser.find_elements(By.CSS_SELECTOR, "#doc .tok")}  # the page redrew them
        _drag(browser, toks["𝕏𝕏Z"], 0.62, toks["news"], 0.5)
        press(browser, digit(browser, "ORG"))
        assert {"start": text.index("𝕏"), "end": text.index(" .") , "label": "ORG"} in state(browser)["item"]["entities"]
        submit_and_wait_for_next(browser, 0)
        (stored,) = app.annotations()
        assert stored["text"] == text
        assert ("𝕏𝕏Z news", "ORG") in spans(text, stored["entities"])
        assert ("Kyoto 🇯🇵 and Zu\u0308rich", "LOC") in spans(text, stored["entities"])
        assert {"start": start, "end": end, "label": "LOC"} in stored["entities"]


def test_right_to_left_text_and_combining_marks_round_trip(browser, serve):
    # pasted (not from the queue): Hebrew and Arabic words, a decomposed é, an emoji, a Latin name
    text = "שלום עולם Olga visited e\u0301te\u0301 مرحبا 😀 Kyoto ."
    with serve() as app:
        open_page(browser, app, expect_item=False)
        assert "queue is empty" in browser.find_element(By.ID, "source").text
        press(browser, "p")  # the paste box, from the keyboard
        box = browser.switch_to.active_element
        assert box.get_attribute("id") == "paste"
        # chromedriver types only BMP characters: the text goes in as a paste would put it
        browser.execute_script("arguments[0].value = arguments[1]", box, text)
        box.send_keys(Keys.CONTROL, Keys.ENTER)
        s = ready(browser)
        assert s["item"]["kind"] == "text" and s["item"]["text"] == text
        # text that starts right-to-left: the arrows follow the reading direction
        assert browser.execute_script("return getComputedStyle(document.getElementById('doc')).direction") == "rtl"
        press(browser, Keys.ESCAPE, Keys.HOME)
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ARROW_LEFT).key_up(Keys.SHIFT).perform()
        press(browser, digit(browser, "LOC"))  # "שלום עולם"
        press(browser, Keys.END, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # back over "Kyoto", "😀" to "مرحبا"
        press(browser, digit(browser, "ORG"))
        press(browser, Keys.ARROW_RIGHT)  # "e\u0301te\u0301"
        press(browser, digit(browser, "PER"))
        wanted = {("שלום עולם", "LOC"), ("مرحبا", "ORG"), ("e\u0301te\u0301", "PER")}
        assert wanted <= set(spans(text, state(browser)["item"]["entities"]))
        submit_and_wait_for_next(browser, 0)
        (stored,) = app.annotations()
        assert stored["text"] == text and stored["meta"]["source"] == "text"
        assert wanted <= set(spans(text, stored["entities"]))
        assert browser.find_element(By.ID, "paste").get_attribute("value") == ""  # stored: the box is cleared


def test_offset_map_matches_python_indices(browser, serve):
    samples = ["", "abc", "😀", "a😀b", "e\u0301", "👩\u200d👩\u200d👧 x", "שלום 😀 مرحبا", "🇯🇵🇯🇵", "\U0001d54f\U0001d54fZ", "tab\tnew\nline"]
    with serve() as app:
        open_page(browser, app, expect_item=False)
        for text in samples:
            units = [len(text[:i].encode("utf-16-le")) // 2 for i in range(len(text) + 1)]
            got = browser.execute_script(
                "const m = new window.nerAnnotate.OffsetMap(arguments[0]);"
                "const units = [...Array(m.length + 1).keys()].map(i => m.unit(i));"
                "return {length: m.length, units, points: units.map(u => m.point(u)),"
                " slices: [...Array(m.length + 1).keys()].map(i => m.slice(0, i)),"
                " plen: window.NerOffsets.pointLength(arguments[0])}",
                text,
            )
            assert got["length"] == got["plen"] == len(text), text
            assert got["units"] == units, text
            assert got["points"] == list(range(len(text) + 1)), text
            assert got["slices"] == [text[:i] for i in range(len(text) + 1)], text
        # a UTF-16 index inside a surrogate pair belongs to that code point; outside the text is an error
        assert browser.execute_script("return new window.nerAnnotate.OffsetMap('a😀b').point(2)") == 1
        assert "outside the text" in browser.execute_script(
            "try { new window.nerAnnotate.OffsetMap('ab').unit(3); return 'no error' } catch (e) { return e.message }"
        )


def test_double_click_on_submit_stores_one_correction(browser, serve):
    with serve() as app:
        app.tag(TEXTS[0], TEXTS[1])
        first = open_page(browser, app)["item"]
        # a slow double click whose second click lands just after the next text appeared: the page
        # clicks itself the moment the next text is ready, and that click must not submit it unseen
        # (the guard's window is widened then, so that a slow test machine cannot make the click late)
        browser.execute_script(
            "const s = window.nerAnnotate.state, first = s.item.predictionId;"
            "const timer = setInterval(() => { if (s.item && s.item.predictionId !== first && !s.busy) {"
            "  clearInterval(timer); window.nerAnnotate.config.freshMs = 5000;"
            "  document.getElementById('submit').click(); window.__late = performance.now() - s.shownAt; } }, 1);"
        )
        ActionChains(browser).double_click(browser.find_element(By.ID, "submit")).perform()
        wait(browser, lambda d: int(d.find_element(By.ID, "sitting").text) >= 1, message="the submit")
        late = wait(browser, lambda d: d.execute_script("return window.__late"), message="the late click")
        assert late < 5000
        s = ready(browser)
        time.sleep(1.0)  # a second submit, had one gone out, would have landed by now
        assert s["item"]["prediction_id"] != first["prediction_id"]
        assert len(app.annotations()) == 1 and app.stored_annotation_rows() == 1
        assert [q["prediction_id"] for q in app.queue()] == [s["item"]["prediction_id"]]  # the next text is untouched
        assert browser.find_element(By.ID, "sitting").text == "1"


def test_a_retry_after_a_lost_answer_stores_once(browser, serve):
    with serve() as app:
        app.tag(TEXTS[1])
        open_page(browser, app)
        press(browser, Keys.DELETE)
        before = state(browser)["item"]
        # the network loses the first answer: the correction reaches the server, the page sees a failure
        browser.execute_script(
            "const real = window.fetch; window.__keys = [];"
            "window.fetch = async (url, opts) => {"
            "  if (String(url).endsWith('/feedback')) {"
            "    window.__keys.push(opts.headers['Idempotency-Key']);"
            "    if (window.__keys.length === 1) { await real(url, opts); throw new TypeError('Failed to fetch'); }"
            "  }"
            "  return real(url, opts);"
            "};"
        )
        press(browser, Keys.ENTER)
        error = wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error").text, message="the error")
        assert "could not be reached" in error and "network_error" in error
        assert state(browser)["item"] == before  # nothing lost
        assert app.stored_annotation_rows() == 1  # it was stored though
        press(browser, Keys.ENTER)  # the retry
        wait(browser, lambda d: d.find_element(By.ID, "sitting").text == "1", message="the retry")
        assert "already stored before" in browser.find_element(By.ID, "notice").text
        keys = browser.execute_script("return window.__keys")
        assert len(keys) == 2 and keys[0] == keys[1]
        assert app.stored_annotation_rows() == 1
        (stored,) = app.annotations()
        assert spans(stored["text"], stored["entities"]) == spans(before["text"], before["entities"])


def test_api_errors_are_shown_in_words_and_nothing_is_lost(browser, serve):
    with serve(max_text_chars=200) as app:
        app.tag(TEXTS[0])
        open_page(browser, app)
        press(browser, Keys.DELETE)  # an edit that must survive the error
        before = state(browser)["item"]
        with closing(sqlite3.connect(app.db_path)) as db, db:
            db.execute("DELETE FROM predictions")  # the prediction goes away under the annotator
        press(browser, Keys.ENTER)
        error = wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error").text, message="the error")
        assert "no stored prediction with id" in error and "prediction_not_found" in error and "404" in error
        assert state(browser)["item"] == before
        assert [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, "#doc .ent")] == ["Paris"]
        # a pasted text over MAX_TEXT_CHARS: the API's reason is shown, the text stays in the box
        press(browser, "p")
        box = browser.switch_to.active_element
        long_text = "Tom visited Oslo . " * 15
        box.send_keys(long_text, Keys.CONTROL, Keys.ENTER)
        error = wait(browser, lambda d: "text_too_long" in d.find_element(By.ID, "error").text and d.find_element(By.ID, "error").text, message="the error")
        assert "the limit is 200" in error
        assert box.get_attribute("value") == long_text
        assert state(browser)["item"] == before


def test_page_asks_for_the_key_when_the_service_requires_one(browser, serve):
    key = "annotator-key-0123456789"
    with serve(api_key=key) as app:
        app.tag(TEXTS[0])
        browser.get(app.url + "/annotate")
        dialog = browser.find_element(By.ID, "key-dialog")
        wait(browser, lambda d: dialog.is_displayed(), message="the key prompt")
        assert "missing X-API-Key header" in browser.find_element(By.ID, "key-reason").text
        browser.find_element(By.ID, "key-input").send_keys("wrong-key-0123456789", Keys.ENTER)
        wait(browser, lambda d: "invalid API key" in d.find_element(By.ID, "key-reason").text and dialog.is_displayed(), message="the second prompt")
        browser.find_element(By.ID, "key-input").send_keys(key, Keys.ENTER)
        s = ready(browser)
        assert s["item"]["text"] == TEXTS[0]
        # kept for this tab only
        assert browser.execute_script("return sessionStorage.getItem('ner-api-key')") == key
        assert browser.execute_script("return Object.keys(localStorage).filter(k => localStorage.getItem(k).includes(arguments[0]))", key) == []
        assert browser.execute_script("return document.cookie") == ""
        submit_and_wait_for_next(browser, 0)
        assert len(app.annotations()) == 1
        # the export link sends the key too (a plain link could not)
        browser.execute_script(
            "const real = window.fetch; window.__exports = [];"
            "window.fetch = async (url, opts) => { const r = await real(url, opts);"
            "  if (String(url).includes('/annotations?')) window.__exports.push([r.status, await r.clone().text()]); return r; };"
        )
        browser.find_element(By.ID, "export").click()
        exports = wait(browser, lambda d: d.execute_script("return window.__exports.length && window.__exports"), message="the export")
        assert exports[0][0] == 200 and TEXTS[0] in exports[0][1]
        assert not browser.find_element(By.ID, "error").is_displayed()
        # a reload in the same tab keeps the key: no second prompt
        browser.refresh()
        wait(browser, lambda d: d.execute_script("return !!(window.nerAnnotate && window.nerAnnotate.state.labels.length)"), message="the reload")
        assert not browser.find_element(By.ID, "key-dialog").is_displayed()
        assert browser.find_element(By.ID, "total").text == "1"
