"""Write the HTML template `dvc plots show` fills, with vega, vega-lite and vega-embed inside it, so the page it
writes renders with no network (DVC's default page loads the three from a CDN: blank plots on an air-gapped machine).

    python -m tools.plots_template --modules vega/node_modules --out vega/dvc_plots.html

`make setup` runs it after `npm ci --prefix vega` (versions pinned by vega/package-lock.json) and points this
checkout's DVC at it with `dvc config --local plots.html_template`. The page DVC writes is then one file.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from stages.lib.io import atomic_file, setup_logging

log = logging.getLogger("tools.plots_template")

# (npm package, its browser build), in load order: vega-lite and vega-embed find vega as a global.
LIBRARIES = (("vega", "build/vega.min.js"), ("vega-lite", "build/vega-lite.min.js"),
             ("vega-embed", "build/vega-embed.min.js"))
# What DVC's HTML class replaces in a template (dvc_render.html.HTML.embed); {plot_divs} is required.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- {versions}: npm packages from vega/package-lock.json, inlined by tools/plots_template.py -->
{libraries}
<style>
  body { font-family: system-ui, sans-serif; }
  table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


class TemplateError(ValueError):
    pass


def read_library(modules: Path, package: str, build: str) -> tuple[str, str]:
    """(version, script source) of one npm package's browser build, made safe to inline."""
    manifest, script = modules / package / "package.json", modules / package / build
    if not script.is_file():
        raise TemplateError(f"{script} is missing: install the pinned libraries first (npm ci --prefix vega, "
                            "which make setup runs)")
    source = script.read_text(encoding="utf-8")
    clash = [p for p in PLACEHOLDERS if p in source]
    if clash:
        raise TemplateError(f"{script} contains {', '.join(clash)}, which DVC would replace inside the script")
    # inline, a source map comment would make devtools fetch a file that is not beside the page
    source = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", source)
    # `</script` inside the code would end the <script> element early; `<\/` means the same in JS strings
    source = re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)
    return json.loads(manifest.read_text(encoding="utf-8"))["version"], source


def build_template(modules: Path) -> str:
    versions, scripts = [], []
    for package, build in LIBRARIES:
        version, source = read_library(modules, package, build)
        versions.append(f"{package} {version}")
        scripts.append(f"<script>\n{source}\n</script>")
    # plain replace, not str.format: the CSS braces stay as they are
    return (PAGE.replace("{versions}", ", ".join(versions)).replace("{libraries}", "\n".join(scripts)))


def main(args: argparse.Namespace) -> int:
    try:
        page = build_template(Path(args.modules))
    except TemplateError as err:
        log.error("%s", err)
        return 2
    with atomic_file(args.out) as fh:
        fh.write(page)
    log.info("wrote %s (%.0f KB); point DVC at it: dvc config --local plots.html_template <path from .dvc/>",
             args.out, len(page.encode()) / 1024)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.plots_template", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", default="vega/node_modules", help="the node_modules folder npm ci made")
    parser.add_argument("--out", default="vega/dvc_plots.html", help="the template to write")
    return parser


if __name__ == "__main__":
    setup_logging()
    sys.exit(main(build_parser().parse_args()))
