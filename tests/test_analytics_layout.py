"""The dashboard's layout in headless Chromium at the screens analysts use (1366x768 laptops,
1920x1080 monitors): no table or chart is wider than its card, no card leaves the window, the page
does not scroll sideways; every card explains itself in one sentence; the forecast's method is
folded under one sentence; the district rates say what they are per. A full-page screenshot of
each size is saved (and its width checked: a page that overflows is captured wider)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.auth import PASSWORD, add_person
from tests.test_analytics import CODE, live_hub, render, seeded  # noqa: F401  (fixtures)

PERIOD = "start=2026-05-01&end=2026-11-22"

MEASURE = """(() => {
  const px = (el, name) => parseFloat(getComputedStyle(el)[name]) || 0;
  const items = [];
  for (const el of document.querySelectorAll("main table, main canvas, main details, main .links")) {
    const card = el.closest(".card");
    const c = card.getBoundingClientRect(), r = el.getBoundingClientRect();
    const innerLeft = c.left + card.clientLeft + px(card, "paddingLeft");
    const innerRight = c.left + card.clientLeft + card.clientWidth - px(card, "paddingRight");
    items.push({id: el.id || el.className || el.tagName, card: card.id, width: r.width, inner: innerRight - innerLeft,
                left: r.left - innerLeft, right: innerRight - r.right, rows: el.dataset.rows || null});
  }
  const cards = [...document.querySelectorAll("main > .card")].map((card) => {
    const r = card.getBoundingClientRect();
    return {id: card.id, left: r.left, right: r.right, overflow: card.scrollWidth - card.clientWidth,
            explain: [...card.querySelectorAll(":scope > p.explain")].map((p) => p.textContent.trim())};
  });
  return {items, cards, page: document.documentElement.scrollWidth, viewport: window.innerWidth};
})()"""


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def login(page: Any, hub: str, user: str) -> None:
    page.goto(f"{hub}/analytics/")
    page.fill("#username", user)
    page.fill("#password", PASSWORD)
    page.click("#login-button", navigates=True)


@pytest.mark.parametrize(("width", "height"), [(1366, 768), (1920, 1080)])
def test_dashboard_fits_its_cards(live_hub: str, seeded: str, browser: Any, tmp_path: Path,  # noqa: F811
                                  width: int, height: int) -> None:
    add_person(seeded, "analyst-layout", "analyst")
    page = browser.new_page(width=width, height=height)
    try:
        login(page, live_hub, "analyst-layout")
        for query in (f"lang=en&{PERIOD}", f"lang=vi&{PERIOD}&finding={CODE['Pneumonia']}"):
            dom = render(page, f"{live_hub}/analytics/?{query}")
            assert "data-error" not in dom
            got = page.evaluate(MEASURE)
            assert got["viewport"] == width and got["page"] <= width, got["page"]  # no sideways scrolling
            assert len(got["cards"]) == 7
            for card in got["cards"]:
                assert card["left"] >= 0 and card["right"] <= width, card
                assert card["overflow"] <= 0, card  # nothing sticks out of a card
                assert len(card["explain"]) >= 1, card["id"]
                for sentence in card["explain"]:  # one sentence each, with what is counted
                    assert sentence.endswith(".") and sentence.count(". ") == 0, sentence
            tables = [i for i in got["items"] if i["id"].startswith("table-")]
            assert {t["id"] for t in tables} == {"table-districts", "table-agreement", "table-backlog", "table-critical"}
            assert all(int(t["rows"]) > 0 for t in tables if t["id"] != "table-backlog"), tables
            for item in got["items"]:
                assert item["width"] <= item["inner"] + 0.5, item
                assert item["left"] >= -0.5 and item["right"] >= -0.5, item
            charts = [i for i in got["items"] if i["id"].startswith("chart-")]
            assert len(charts) == 4 and all(c["width"] >= c["inner"] - 1 for c in charts)  # they fill the card
            shot = page.screenshot(tmp_path / f"dashboard-{width}x{height}-{query[:7]}.png")
            shot_width, shot_height = png_size(shot)
            assert width - 20 <= shot_width <= width and shot_height >= height  # (less a scroll bar)
            print(f"screenshot: {shot}")

        # The forecast method is folded under one sentence; opened, it lists every series' method and error.
        details = page.evaluate("(() => { const d = document.getElementById('forecast-details');"
                                " return {open: d.open, shown: document.getElementById('forecast-method').checkVisibility(),"
                                " extra: d.getBoundingClientRect().height - d.querySelector('summary')"
                                ".getBoundingClientRect().height, items: d.querySelectorAll('li').length}; })()")
        assert details["open"] is False and details["shown"] is False and details["extra"] < 1 and details["items"] > 0
        page.click("#forecast-details summary")
        text = page.wait_for("document.getElementById('forecast-details').open &&"
                             " document.getElementById('forecast-method').innerText")
        assert "ETS" in text and "MAE" in text
    finally:
        page.close()


def test_district_rates_say_what_they_are_per(live_hub: str, seeded: str, page: Any) -> None:  # noqa: F811
    add_person(seeded, "analyst-rates", "analyst")
    login(page, live_hub, "analyst-rates")
    heads = "JSON.stringify([...document.querySelectorAll('#table-districts th')].map((th) => th.textContent))"
    render(page, f"{live_hub}/analytics/?lang=en&{PERIOD}")
    assert json.loads(page.evaluate(heads))[1:] == ["AI-read studies", "Not analysable", "Critical", "Positive findings",
                                                    "Positive findings per 1,000 AI-read studies",
                                                    "Critical studies per 1,000 AI-read studies"]
    render(page, f"{live_hub}/analytics/?lang=en&{PERIOD}&finding={CODE['Pneumonia']}")
    rate = json.loads(page.evaluate(heads))[5]
    assert rate.endswith(" per 1,000 studies the AI read for it") and rate != " per 1,000 studies the AI read for it"
    render(page, f"{live_hub}/analytics/?{PERIOD}")
    assert json.loads(page.evaluate(heads))[5] == "Phát hiện dương tính trên 1.000 ca AI đã đọc"
