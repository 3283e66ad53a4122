#!/usr/bin/env python
"""Render every notebook under nbs/ (examples included) to static HTML pages in _docs/, with an index page.

    python tools/render_docs.py [--nbs nbs] [--out _docs] [--widgets vendor|cdn] [--packages-from DIR]

Quarto (what nbdev_docs needs) is not available here, so this uses nbconvert's HTMLExporter (the `lab`
template). Notebooks are committed with their outputs and are NOT re-executed: a page shows exactly what the
notebook holds, plots as embedded PNGs and widgets from the widget state saved in the notebook's metadata.

Widgets are drawn in the browser by the @jupyter-widgets/html-manager bundle, which needs require.js. With
`--widgets vendor` (the default) both are copied into `_docs/_static/` (fetched once with `npm pack`, or taken
from `.tgz` files in `--packages-from DIR`), so the pages work offline; `--widgets cdn` leaves nbconvert's CDN
URLs (unpkg, cdnjs), which need the internet when a page is viewed. MathJax always comes from its CDN.

As nbdev's docs do, cells marked `#| hide` are left out and `#| ...` directive lines are not shown.
The front page is nbs/index.ipynb with a list of all pages (title and summary from each notebook's first
markdown heading and its `> summary` line) inserted after its first cell."""
from __future__ import annotations

import argparse
import copy
import html
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
HTML_MANAGER = "@jupyter-widgets/html-manager@1.0.15"  # the widget renderer for ipywidgets 8
REQUIREJS = "requirejs@2.3.8"
STATIC = "_static"
FONT_SUFFIXES = {".eot", ".svg", ".ttf", ".woff", ".woff2"}
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(\S+)")

NAV_CSS = """<style>
.docs-nav { font-family: system-ui, sans-serif; font-size: 14px; padding: 8px 16px; border-bottom: 1px solid #ddd;
            display: flex; gap: 1.5em; background: #fafafa; }
.docs-nav a { text-decoration: none; }
.docs-nav .docs-next { margin-left: auto; }
</style>"""


@dataclass
class Page:
    "One notebook and where its page goes."
    source: Path  # the notebook
    href: str  # the page, relative to the output folder (posix)
    title: str
    summary: str  # markdown

    @property
    def prefix(self) -> str:
        "From this page back to the output folder: '' or '../' per level."
        return "../" * self.href.count("/")


def find_notebooks(nbs: Path) -> list[Path]:
    "index.ipynb first, then the numbered notebooks in order, then nbs/examples/ (and any other subfolder)."
    found = [p for p in nbs.rglob("*.ipynb")
             if not any(part.startswith((".", "_")) for part in p.relative_to(nbs).parts)]
    def key(p: Path):
        rel = p.relative_to(nbs)
        return (rel != Path("index.ipynb"), len(rel.parts) > 1, rel.as_posix())
    return sorted(found, key=key)


def _plain(markdown: str) -> str:
    "A heading or summary as plain text: no code ticks, bold marks or link targets (underscores stay: names)."
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return text.replace("`", "").replace("**", "").strip()


def title_and_summary(nb, fallback: str) -> tuple[str, str]:
    "The first markdown heading (any level) as plain text, and the `> summary` line below it (markdown), if any."
    for cell in nb.cells:
        if cell.cell_type != "markdown": continue
        lines = cell.source.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
            if not m: continue
            summary = next((l[1:].strip() for l in lines[i + 1:] if l.strip()), "")
            following = next((l for l in lines[i + 1:] if l.strip()), "")
            return _plain(m.group(1)), summary if following.startswith(">") else ""
    return fallback, ""


def for_reading(nb):
    "A copy of `nb` as the docs show it: `#| hide` cells dropped, directive lines taken out of code."
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines = cell.source.splitlines()
            directives = {m.group(1) for l in lines if (m := DIRECTIVE.match(l))}
            if "hide" in directives: continue
            code = [l for l in lines if not DIRECTIVE.match(l)]
            if not any(l.strip() for l in code) and not cell.get("outputs"): continue  # e.g. only `#| default_exp`
            cell.source = "\n".join(code).strip("\n")
        cells.append(cell)
    nb.cells = cells
    return nb


def contents_cell(pages: list[Page], current: Page):
    "A markdown cell listing every page but `current`, modules first, then examples."
    def item(p: Page) -> str:
        href = current.prefix + p.href
        return f"- [{p.title}]({href})" + (f": {p.summary}" if p.summary else "")
    top = [p for p in pages if p is not current and "/" not in p.href]
    nested = [p for p in pages if p is not current and "/" in p.href]
    text = "## Contents\n\n" + "\n".join(item(p) for p in top)
    if nested: text += "\n\n### Examples\n\n" + "\n".join(item(p) for p in nested)
    return nbformat.v4.new_markdown_cell(text)


def nav_html(pages: list[Page], i: int) -> str:
    "Links at the top of page `i`: the index, the previous and the next page."
    page = pages[i]
    def link(p: Page, cls: str, label: str) -> str:
        return f'<a class="{cls}" href="{html.escape(page.prefix + p.href)}">{label}</a>'
    parts = [link(pages[0], "docs-home", "&#8962; " + html.escape(pages[0].title))] if i else []
    if i > 1: parts.append(link(pages[i - 1], "docs-prev", "&larr; " + html.escape(pages[i - 1].title)))
    if i + 1 < len(pages): parts.append(link(pages[i + 1], "docs-next", html.escape(pages[i + 1].title) + " &rarr;"))
    return NAV_CSS + '<nav class="docs-nav">' + "".join(parts) + "</nav>"


def exporter(page: Page, widgets: str) -> HTMLExporter:
    ex = HTMLExporter(template_name="lab", embed_images=True)  # markdown images too: pages stand alone
    ex.html_manager_semver_range = HTML_MANAGER.rsplit("@", 1)[1]
    if widgets == "vendor":
        ex.require_js_url = f"{page.prefix}{STATIC}/require.js"
        ex.widget_renderer_url = f"{page.prefix}{STATIC}/html-manager/embed-amd.js"
    return ex


def render_page(pages: list[Page], i: int, out: Path, widgets: str) -> Path:
    page = pages[i]
    nb = for_reading(nbformat.read(page.source, as_version=4))
    if i == 0:  # the front page: nbs/index.ipynb, with the list of pages after its first cell
        nb.cells.insert(1 if nb.cells else 0, contents_cell(pages, page))
    body, _ = exporter(page, widgets).from_notebook_node(
        nb, resources={"metadata": {"name": page.title, "path": str(page.source.parent)}})
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav_html(pages, i), body, count=1)
    target = out / page.href
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def _npm_pack(specs: list[str], into: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("render_docs: npm is needed to fetch the widget renderer for offline pages (apt-get install -y npm), "
                 "or pass --widgets cdn to load it from a CDN when a page is viewed")
    done = subprocess.run([npm, "pack", *specs, "--pack-destination", str(into), "--silent"],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"render_docs: `npm pack {' '.join(specs)}` failed:\n{done.stderr.strip()}\n"
                 "pass --widgets cdn to load the widget renderer from a CDN instead")


def _tarball(folder: Path, spec: str) -> Path:
    "The `npm pack` file of `spec` in `folder` (npm names it scope-name-version.tgz)."
    name, version = spec.rsplit("@", 1)
    path = folder / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not path.exists(): sys.exit(f"render_docs: {path} is missing (expected the `npm pack` file of {spec})")
    return path


def _extract(tar: tarfile.TarFile, into: Path) -> None:
    "Unpack `tar`, refusing members that would land outside `into` (the 'data' filter where Python has it)."
    if hasattr(tarfile, "data_filter"): return tar.extractall(into, filter="data")
    for member in tar.getmembers():
        if not (into / member.name).resolve().is_relative_to(into.resolve()) or member.issym() or member.islnk():
            sys.exit(f"render_docs: refusing to unpack {member.name!r}")
    tar.extractall(into)


def vendor_widget_assets(static: Path, packages_from: Path | None = None) -> None:
    "Put require.js and the html-manager bundle (with its fonts) under `static`, once per version."
    stamp = static / "VENDORED"
    wanted = f"{HTML_MANAGER}\n{REQUIREJS}\n"
    if stamp.exists() and stamp.read_text() == wanted: return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if packages_from is None: _npm_pack([HTML_MANAGER, REQUIREJS], tmp)
        for spec, folder in ((HTML_MANAGER, "html-manager"), (REQUIREJS, "requirejs")):
            with tarfile.open(_tarball(packages_from or tmp, spec)) as tar: _extract(tar, tmp / folder)
        dist = tmp / "html-manager" / "package" / "dist"
        if not (dist / "embed-amd.js").exists(): sys.exit(f"render_docs: {HTML_MANAGER} has no dist/embed-amd.js")
        shutil.rmtree(static / "html-manager", ignore_errors=True)
        (static / "html-manager").mkdir(parents=True)
        for f in dist.iterdir():
            if f.name == "embed-amd.js" or f.suffix in FONT_SUFFIXES or "LICENSE" in f.name:
                shutil.copy(f, static / "html-manager" / f.name)
        for lic in (tmp / "html-manager" / "package").glob("LICENSE*"): shutil.copy(lic, static / "html-manager")
        shutil.copy(tmp / "requirejs" / "package" / "require.js", static / "require.js")
    stamp.write_text(wanted)


def render_docs(nbs: Path, out: Path, widgets: str = "vendor", packages_from: Path | None = None) -> list[Page]:
    "Render every notebook under `nbs` into `out`, index first; returns the pages made."
    notebooks = find_notebooks(nbs)
    if not notebooks: sys.exit(f"render_docs: no notebooks under {nbs}")
    pages = []
    for path in notebooks:
        rel = path.relative_to(nbs)
        title, summary = title_and_summary(nbformat.read(path, as_version=4), fallback=path.stem)
        pages.append(Page(path, rel.with_suffix(".html").as_posix(), title, summary))
    if pages[0].href != "index.html":  # no nbs/index.ipynb: a front page that only lists the others
        pages.insert(0, Page(Path(""), "index.html", "Documentation", ""))
    out.mkdir(parents=True, exist_ok=True)
    if widgets == "vendor": vendor_widget_assets(out / STATIC, packages_from)
    for i, page in enumerate(pages):
        if page.source.name: render_page(pages, i, out, widgets)
        else: _render_plain_index(pages, out, widgets)
    made = {out / p.href for p in pages}
    for stale in out.rglob("*.html"):  # pages of notebooks that are gone
        if stale not in made and STATIC not in stale.relative_to(out).parts: stale.unlink()
    return pages


def _render_plain_index(pages: list[Page], out: Path, widgets: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Documentation")])
    nb.cells.append(contents_cell(pages, pages[0]))
    body, _ = exporter(pages[0], widgets).from_notebook_node(nb, resources={"metadata": {"name": "Documentation"}})
    (out / "index.html").write_text(body, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nbs", type=Path, default=ROOT / "nbs", help="the notebooks (default: nbs/ of this repo)")
    parser.add_argument("--out", type=Path, default=ROOT / "_docs", help="where the pages go (default: _docs/ of this repo)")
    parser.add_argument("--widgets", choices=["vendor", "cdn"], default="vendor",
                        help="vendor: copy the widget renderer into the docs (offline pages); cdn: load it when viewed")
    parser.add_argument("--packages-from", type=Path, default=None,
                        help="a folder holding the `npm pack` .tgz files to vendor, instead of running npm")
    args = parser.parse_args(argv)
    pages = render_docs(args.nbs, args.out, args.widgets, args.packages_from)
    print(f"render_docs: {len(pages)} pages in {args.out}/ (open {args.out / 'index.html'})")


if __name__ == "__main__":
    main()
