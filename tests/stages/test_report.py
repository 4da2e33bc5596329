"""Stage report: reports/index.html, opened in headless chromium, shows metrics.json's numbers, every image, and
asks the network for nothing; quoted text is escaped; a mixed or missing input fails before anything is written."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from helpers import MARKUP, ROOT, SECRET, outside_requests, save_screenshot, write_report_inputs

from stages.lib.config import GROUPS
from stages.lib.evaluation.report_page import flatten, pick_stratified, pick_worst
from stages.report import PARAMS, build_parser, main


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    main(build_parser().parse_args(write_report_inputs(root)))
    return root


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_in_a_browser_shows_metrics_json_every_image_and_loads_nothing(built, browser):
    browser.get((built / "reports" / "index.html").as_uri())
    shown = browser.execute_script(
        "return [...document.querySelectorAll('[data-metric]')]"
        ".map(e => [e.dataset.metric, e.dataset.value, e.textContent.trim()])")
    images = browser.execute_script(
        "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
    escaped = browser.execute_script("return [window.pwned, document.scripts.length, document.body.innerText]")
    save_screenshot(browser, "report")
    outside = outside_requests(browser)

    expected = flatten(json.loads((built / "headline.json").read_text()))
    assert {key for key, _, _ in shown} == set(expected)  # every headline number is on the page, none invented
    for key, value, text in shown:
        want = expected[key]
        if isinstance(want, str):
            assert value == text == want, key
        else:
            assert float(value) == want, key  # the exact number behind the cell
            assert abs(float(text.replace(",", "")) - want) <= 5e-5, (key, text)  # and what a reader sees
    plots = sorted(p.name for p in (built / "reports" / "plots").glob("*.png"))
    assert sorted(alt for alt, _, _ in images) == plots
    assert all(complete and width > 0 for _, complete, width in images), images
    assert escaped[0] is None and escaped[1] == 0  # the quoted <script> and onerror did not run
    assert MARKUP in escaped[2] and SECRET in escaped[2]  # they are shown as text instead
    assert outside == []


def test_page_is_one_file_with_nothing_to_fetch(built):
    raw = (built / "reports" / "index.html").read_text()
    parser = Tags()
    parser.feed(raw)
    tags = parser.tags
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert [a["src"][:22] for t, a in tags if t == "img"] == ["data:image/png;base64,"] * 4
    assert "url(" not in raw and "@import" not in raw
    assert MARKUP not in raw and "&lt;script&gt;window.pwned" in raw


def test_page_explains_every_headline_metric(built):
    raw = (built / "reports" / "index.html").read_text()
    assert "not medical advice" in raw and "How to read this" in raw
    for label in ("ROUGE-L", "BLEU", "BERTScore F1", "Perplexity"):
        assert f"{label}" in raw
    assert raw.count('class="meaning"') >= 13  # one line for each row of the scores table


def test_mixed_compare_outputs_are_refused_and_nothing_is_written(tmp_path):
    args = write_report_inputs(tmp_path)
    headline = json.loads((tmp_path / "headline.json").read_text())
    headline["finetuned"]["rougeL"] += 0.01
    (tmp_path / "headline.json").write_text(json.dumps(headline))
    with pytest.raises(ValueError, match=r"finetuned\.rougeL.*different compare runs"):
        main(build_parser().parse_args(args))
    assert not (tmp_path / "reports" / "index.html").exists()


def test_missing_plots_are_named(tmp_path):
    args = write_report_inputs(tmp_path)
    for png in (tmp_path / "reports" / "plots").glob("*.png"):
        png.unlink()
    with pytest.raises(FileNotFoundError, match="no PNGs.*dvc repro plot"):
        main(build_parser().parse_args(args))
    assert not (tmp_path / "reports" / "index.html").exists()


def test_samples_are_one_typical_answer_per_type_and_the_worst():
    preds = [{"id": f"q{i}", "qtype": "ab"[i % 2], "finetuned_rougeL": i / 10} for i in range(9)]
    assert [p["id"] for p in pick_stratified(preds)] == ["q4", "q3"]  # medians of a: 0,2,4,6,8; b: 1,3,5,7
    assert [p["id"] for p in pick_worst(preds, 3)] == ["q0", "q1", "q2"]


def test_the_page_shows_every_params_group_and_is_cached_not_committed():
    assert set(PARAMS) == set(GROUPS)
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["outs"]
    assert "reports/index.html" in outs  # a plain entry: DVC caches it (it quotes MedQuAD), git ignores it


def test_every_number_of_the_scores_table_has_its_meaning_line():
    from stages.lib.evaluation.report import TABLE_ROWS
    from stages.lib.evaluation.report_page import MEANINGS

    missing = [key for key, _, _ in TABLE_ROWS if not MEANINGS.get(key)]
    assert missing == []


def test_multiple_choice_suites_get_their_own_table(tmp_path):
    suites = {"medqa": {"n": 24, "base": 0.125, "finetuned": 0.375, "delta": 0.25, "delta_ci95_low": 0.0417,
                        "delta_ci95_high": 0.4583, "chance": 0.25, "majority": 0.3333},
              "pubmedqa": {"n": 16, "base": 0.625, "finetuned": 0.4375, "delta": -0.1875, "delta_ci95_low": -0.4375,
                           "delta_ci95_high": 0.0625, "chance": 0.3333, "majority": 0.5, "base_macro_f1": 0.41}}
    (tmp_path / "mcq.json").write_text(json.dumps(suites))
    args = write_report_inputs(tmp_path) + ["--mcq-metrics", str(tmp_path / "mcq.json")]
    main(build_parser().parse_args(args))
    page = (tmp_path / "reports" / "index.html").read_text()
    table = page[page.index("<h3>Multiple-choice benchmarks</h3>"):]
    table = table[:table.index("</table>")]
    rows = [r for r in table.split("<tr>")[1:] if "<td>" in r]
    assert [r.split("<td>")[1].split("</td>")[0] for r in rows] == ["medqa", "pubmedqa"]
    assert ">0.375<" in rows[0] and ">-0.188<" in rows[1] and ">24<" in rows[0]  # fine-tuned, delta, n


def test_without_multiple_choice_metrics_the_page_has_no_such_table(built):
    assert "Multiple-choice benchmarks" not in (built / "reports" / "index.html").read_text()
