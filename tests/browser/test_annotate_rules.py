"""The annotation page's proposals get the entity rules (docs/rules.md): a rule added after a text
was stored shows on that text in the queue, marked as a rule's entity."""
from __future__ import annotations

import httpx
from selenium.webdriver.common.by import By

from tests.browser.test_annotate_page import open_page, spans

ADMIN = {"X-Admin-Key": "b" * 24}


def test_queue_proposals_apply_the_current_rules(browser, serve):
    text = "Anna Berg visited Paris ."
    with serve(admin_key=ADMIN["X-Admin-Key"]) as app:
        app.tag(text)
        (stored,) = app.queue()
        assert ("Paris", "LOC") in spans(text, stored["entities"])
        r = httpx.post(app.url + "/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "paris", "label": "ORG"}]}, timeout=30)
        assert r.status_code == 201, r.text
        s = open_page(browser, app)
        assert s["item"]["prediction_id"] == stored["prediction_id"]
        assert spans(text, s["item"]["entities"]) == [("Anna Berg", "PER"), ("Paris", "ORG")]
        rule_id = httpx.get(app.url + "/admin/rules", headers=ADMIN, timeout=30).json()["rules"][0]["id"]
        titles = {e.text.strip(): e.get_attribute("title") for e in browser.find_elements(By.CSS_SELECTOR, "#doc .ent")}
        assert titles["Paris"] == f"ORG, from entity rule {rule_id}"
        assert titles["Anna Berg"].startswith("PER, score ")
