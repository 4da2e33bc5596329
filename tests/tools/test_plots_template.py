"""plots_template: the `dvc plots show` template with vega, vega-lite and vega-embed inlined. DVC fills it, and the
page renders its plots in headless chromium with no request leaving the machine; bad library files are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, outside_requests, save_screenshot
from tools import plots_template

MODULES = ROOT / "vega" / "node_modules"  # npm ci --prefix vega (make setup)


def fake_modules(root: Path, source: str = "var x = 1;") -> Path:
    for package, build in plots_template.LIBRARIES:
        (root / package / build).parent.mkdir(parents=True)
        (root / package / "package.json").write_text(json.dumps({"version": "1.2.3"}))
        (root / package / build).write_text(f"{source}\n//# sourceMappingURL={package}.min.js.map\n")
    return root


def test_template_inlines_the_three_libraries_in_order(tmp_path):
    page = plots_template.build_template(fake_modules(tmp_path, 'var s = "</script>";'))
    assert page.count("{plot_divs}") == 1 and "{refresh_tag}" in page and "{scripts}" not in page
    assert "vega 1.2.3, vega-lite 1.2.3, vega-embed 1.2.3" in page
    assert page.count("<script>") == 3 and page.count("</script>") == 3  # the one inside the code is escaped
    assert 'var s = "<\\/script>";' in page and "sourceMappingURL" not in page
    assert "http" not in page


@pytest.mark.parametrize("breakage, message", [
    ("missing", r"vega\.min\.js is missing: install the pinned libraries first \(npm ci --prefix vega"),
    ("placeholder", r"contains \{plot_divs\}, which DVC would replace"),
])
def test_bad_library_files_are_refused_and_nothing_is_written(tmp_path, caplog, breakage, message):
    modules = fake_modules(tmp_path / "m", "var t = '{plot_divs}';" if breakage == "placeholder" else "var x;")
    if breakage == "missing":
        (modules / "vega" / "build" / "vega.min.js").unlink()
    args = plots_template.build_parser().parse_args(["--modules", str(modules), "--out", str(tmp_path / "t.html")])
    assert plots_template.main(args) == 2
    assert not (tmp_path / "t.html").exists()
    with pytest.raises(plots_template.TemplateError, match=message):
        plots_template.build_template(modules)


def test_dvc_plots_show_renders_offline_in_a_browser(tmp_path, browser):
    if not (MODULES / "vega" / "build" / "vega.min.js").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{MODULES} is missing: make setup runs npm ci --prefix vega")
        pytest.skip(f"{MODULES} is missing (make setup)")
    template = tmp_path / "dvc_plots.html"
    assert plots_template.main(plots_template.build_parser().parse_args(
        ["--modules", str(MODULES), "--out", str(template)])) == 0

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "loss.tsv").write_text("step\tloss\n0\t3.0\n1\t2.4\n2\t2.1\n")
    (repo / "per_qtype.csv").write_text("qtype,finetuned_rougeL\nsymptoms,0.19\ncauses,0.17\n")
    (repo / "dvc.yaml").write_text("plots:\n  - loss.tsv:\n      x: step\n  - per_qtype.csv:\n"
                                   "      x: finetuned_rougeL\n      y: qtype\n      template: bar_horizontal\n")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["init", "--no-scm", "-q"], ["config", "--local", "plots.html_template", str(template)],
                ["plots", "show", "-o", "out"]):
        subprocess.run(dvc + cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    page = repo / "out" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()

    browser.get(page.as_uri())
    browser.implicitly_wait(0)
    drawn = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], start = Date.now();
        (function poll() {
          const embeds = [...document.querySelectorAll('.vega-embed')];
          const drawn = embeds.filter(e => e.querySelector('canvas, svg.marks')).length;
          if ((embeds.length && drawn === embeds.length) || Date.now() - start > 10000) done([embeds.length, drawn]);
          else setTimeout(poll, 100);
        })();""")
    save_screenshot(browser, "dvc_plots")
    assert drawn == [2, 2]
    assert outside_requests(browser) == []
