"""Tests of tools/render_docs.py (`make docs`): static HTML pages of every notebook, with an index; and of
README.md as a front page (its size, its links to the project's files).

The script runs as a subprocess, as `make docs` runs it; pages are read back with BeautifulSoup, and what they
must contain is taken from the notebooks themselves with nbformat (titles, PNG payloads, widget state). Nothing
is downloaded: the CDN mode is used, or the vendoring is fed small local packages built here."""
from __future__ import annotations

import configparser
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "render_docs.py"
NBS = ROOT / "nbs"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
v4 = nbformat.v4


def render(nbs: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), "--nbs", str(nbs), "--out", str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, f"render_docs failed:\n{done.stdout}\n{done.stderr}"
    return done


def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def notebooks_under(nbs: Path) -> list[Path]:
    return sorted(p for p in nbs.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def first_heading(nb) -> str | None:
    "The first markdown heading, as plain text: an oracle written apart from the script's."
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip().replace("`", "").replace("**", "")
    return None


def index_links(out: Path) -> dict[str, str]:
    "href -> link text of the links in the index page's contents list."
    page = soup(out / "index.html")
    return {a["href"]: a.get_text(strip=True) for a in page.select(".jp-MarkdownOutput a[href$='.html']")}


def png_payloads(nb) -> list[str]:
    return [o["data"]["image/png"].replace("\n", "") for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


# ------------------------------------------------------------------ the project's own notebooks

@pytest.fixture(scope="module")
def project_docs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    render(NBS, out, "--widgets", "cdn")
    return out


def test_every_notebook_has_a_page_linked_from_the_index(project_docs):
    notebooks = notebooks_under(NBS)
    assert any(p.name == "index.ipynb" for p in notebooks)
    links = index_links(project_docs)
    for nb_path in notebooks:
        href = nb_path.relative_to(NBS).with_suffix(".html").as_posix()
        page = project_docs / href
        assert page.exists(), f"no page for {nb_path.relative_to(ROOT)}"
        if href == "index.html": continue
        assert href in links, f"the index does not link {href}; it links {sorted(links)}"
        title = first_heading(nbformat.read(nb_path, as_version=4)) or nb_path.stem
        assert links[href] == title, f"the index calls {href} {links[href]!r}, its notebook's heading is {title!r}"
        assert soup(page).title.get_text(strip=True) == title
    examples = [h for h in links if h.startswith("examples/")]
    assert len(examples) == len([p for p in notebooks if "examples" in p.relative_to(NBS).parts])


def test_every_local_link_resolves(project_docs):
    for page in project_docs.rglob("*.html"):
        for a in soup(page).find_all("a", href=True):
            href = a["href"].split("#")[0]
            if not href or re.match(r"^[a-z]+:", href): continue  # same-page anchors and web links
            assert (page.parent / href).resolve().exists(), f"{page.relative_to(project_docs)} links {href}: missing"


def test_front_page_is_index_notebook_with_contents(project_docs):
    page = soup(project_docs / "index.html")
    index = nbformat.read(NBS / "index.ipynb", as_version=4)
    headings = [h.get_text(strip=True).rstrip("¶") for h in page.select("h1, h2")]
    assert headings[0] == first_heading(index)
    assert "Contents" in headings
    # the index notebook's own text is on the front page
    first_para = next(l for c in index.cells if c.cell_type == "markdown" for l in c.source.splitlines()
                      if l.strip() and not l.startswith(("#", ">", "-", "|", "`", "<", "!", "[")))
    words = re.sub(r"[`*\[\]]|\(http[^)]*\)", "", first_para)[:40]
    assert words in page.get_text(" "), f"front page lacks the index notebook's text {words!r}"


def test_saved_plots_are_embedded_as_png(project_docs):
    with_plots = [p for p in notebooks_under(NBS) if png_payloads(nbformat.read(p, as_version=4))]
    assert with_plots, "no notebook holds a saved plot; 07_schedule should"
    for nb_path in with_plots:
        page = soup(project_docs / nb_path.relative_to(NBS).with_suffix(".html"))
        sources = {img["src"] for img in page.find_all("img") if img.get("src", "").startswith("data:image/png;base64,")}
        for payload in png_payloads(nbformat.read(nb_path, as_version=4)):
            assert f"data:image/png;base64,{payload}" in sources, f"a PNG of {nb_path.name} is not in its page"


def test_saved_widget_state_is_embedded(project_docs):
    with_widgets = [p for p in notebooks_under(NBS)
                    if WIDGET_STATE in nbformat.read(p, as_version=4).metadata.get("widgets", {})]
    if not with_widgets: pytest.skip("no notebook in nbs/ holds widget state (08_inspector should)")
    for nb_path in with_widgets:
        nb = nbformat.read(nb_path, as_version=4)
        page = soup(project_docs / nb_path.relative_to(NBS).with_suffix(".html"))
        state = page.find("script", type=WIDGET_STATE)
        assert state is not None and json.loads(state.string) == nb.metadata["widgets"][WIDGET_STATE]
        views = [json.loads(s.string)["model_id"] for s in page.find_all("script", type=WIDGET_VIEW)]
        saved = [o["data"][WIDGET_VIEW]["model_id"] for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if WIDGET_VIEW in o.get("data", {})]
        assert views == saved and all(v in nb.metadata["widgets"][WIDGET_STATE]["state"] for v in views)


# ------------------------------------------------------------------ the front page, README.md

def repository_url() -> str:
    "settings.ini's git_url and branch: where README.md's links to the project's own files point."
    settings = configparser.ConfigParser()
    settings.read(ROOT / "settings.ini")
    return f"{settings['DEFAULT']['git_url']}/blob/{settings['DEFAULT']['branch']}/"


def test_readme_is_a_front_page():
    "At most 250 lines (issue 20); the benchmark diary and the architecture notes live on pages of their own."
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it a front page (at most 250)"


def test_readme_links_to_project_files_resolve():
    "README.md is also on GitHub, where a relative link breaks: links to the project's files are absolute and exist."
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]
    assert not relative, f"README.md links {relative}: link the project's files by {repository_url()}<path>"
    own = [t.split("#")[0].removeprefix(repository_url()) for t in targets if t.startswith(repository_url())]
    assert own, "README.md links no page of the project"
    missing = [path for path in own if not (ROOT / path).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"


# ------------------------------------------------------------------ small notebooks made here

def code(source: str, *outputs) -> nbformat.NotebookNode:
    cell = v4.new_code_cell(source)
    cell.outputs = list(outputs)
    return cell


def stream(text: str): return v4.new_output("stream", name="stdout", text=text)


PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
STATE = {"version_major": 2, "version_minor": 0, "state": {"m1": {
    "model_name": "CheckboxModel", "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
    "state": {"value": True, "description": "on"}}}}


@pytest.fixture
def small_nbs(tmp_path) -> Path:
    nbs = tmp_path / "nbs"
    (nbs / "examples").mkdir(parents=True)
    (nbs / ".ipynb_checkpoints").mkdir()
    def write(rel: str, cells, **metadata):
        nb = v4.new_notebook(cells=cells)
        nb.metadata.update(metadata)
        nbformat.write(nb, nbs / rel)
    write("index.ipynb", [v4.new_markdown_cell("# Little project\n\n> Front page summary.\n\nWelcome text here.")])
    write("01_alpha.ipynb", [
        v4.new_markdown_cell("Some words before any heading.\n\n## Alpha: the `first` **one**\n\n> Alpha summary"),
        code("#| default_exp alpha"),
        code("#| export\ndef shown_function(): return 1"),
        code("#| hide\nsecret_setup = 42"),
        code('print("fresh " + "run")', stream("STORED OUTPUT\n")),
        code("plot()", v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})),
    ])
    write("02_untitled.ipynb", [code("1 + 1", v4.new_output("execute_result", data={"text/plain": "2"},
                                                               execution_count=1))])
    write("examples/widget_example.ipynb", [
        v4.new_markdown_cell("# A widget example"),
        code("box", v4.new_output("display_data", data={WIDGET_VIEW: {"version_major": 2, "version_minor": 0,
                                                                       "model_id": "m1"}, "text/plain": "Checkbox"})),
    ], widgets={WIDGET_STATE: STATE})
    write(".ipynb_checkpoints/01_alpha-checkpoint.ipynb", [v4.new_markdown_cell("# Checkpoint")])
    return nbs


def test_pages_titles_and_links_of_a_small_project(small_nbs, tmp_path):
    out = tmp_path / "docs"
    render(small_nbs, out, "--widgets", "cdn")
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    assert pages == ["01_alpha.html", "02_untitled.html", "examples/widget_example.html", "index.html"]
    assert index_links(out) == {"01_alpha.html": "Alpha: the first one",
                                "02_untitled.html": "02_untitled", "examples/widget_example.html": "A widget example"}
    front = soup(out / "index.html")
    assert "Welcome text here." in front.get_text() and "Alpha summary" in front.get_text()
    # every page links back to the index, and to its neighbours
    example = soup(out / "examples" / "widget_example.html")
    nav = {a["href"] for a in example.select("nav.docs-nav a")}
    assert nav == {"../index.html", "../02_untitled.html"}
    alpha_nav = {a["href"] for a in soup(out / "01_alpha.html").select("nav.docs-nav a")}
    assert alpha_nav == {"index.html", "02_untitled.html"}


def test_without_index_notebook_a_front_page_lists_the_pages(small_nbs, tmp_path):
    (small_nbs / "index.ipynb").unlink()
    out = tmp_path / "docs"
    render(small_nbs, out, "--widgets", "cdn")
    assert set(index_links(out)) == {"01_alpha.html", "02_untitled.html", "examples/widget_example.html"}


def test_pages_of_removed_notebooks_are_removed(small_nbs, tmp_path):
    out = tmp_path / "docs"
    render(small_nbs, out, "--widgets", "cdn")
    (small_nbs / "02_untitled.ipynb").unlink()
    (out / "keep.txt").write_text("not a page")
    render(small_nbs, out, "--widgets", "cdn")
    assert not (out / "02_untitled.html").exists() and (out / "keep.txt").exists()
    assert "02_untitled.html" not in index_links(out)


def test_pages_show_stored_outputs_without_running_and_hide_nbdev_directives(small_nbs, tmp_path):
    out = tmp_path / "docs"
    render(small_nbs, out, "--widgets", "cdn")
    page = soup(out / "01_alpha.html")
    outputs = " ".join(o.get_text() for o in page.select(".jp-OutputArea-output"))
    assert "STORED OUTPUT" in outputs and "fresh run" not in outputs, "the notebook must not be re-executed"
    text = page.get_text()
    assert "shown_function" in text and "#| export" not in text and "default_exp" not in text
    assert "secret_setup" not in text, "a `#| hide` cell must not be shown"
    assert page.find("img", src=f"data:image/png;base64,{PNG}") is not None


def test_cdn_mode_points_at_the_html_manager_on_unpkg(small_nbs, tmp_path):
    out = tmp_path / "docs"
    render(small_nbs, out, "--widgets", "cdn")
    text = (out / "examples" / "widget_example.html").read_text()
    assert "https://unpkg.com/@jupyter-widgets/html-manager@1.0.15/dist/embed-amd.js" in text
    assert not (out / "_static").exists()
    state = soup(out / "examples" / "widget_example.html").find("script", type=WIDGET_STATE)
    assert json.loads(state.string) == STATE


def fake_npm_packages(folder: Path) -> Path:
    "Stand-ins for the `npm pack` files of the html-manager and require.js, as npm names them."
    folder.mkdir()
    def tgz(name: str, files: dict[str, bytes]):
        with tarfile.open(folder / name, "w:gz") as tar:
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tgz("jupyter-widgets-html-manager-1.0.15.tgz", {
        "package/package.json": b"{}", "package/dist/embed-amd.js": b"/* embed-amd */",
        "package/dist/abc123.woff2": b"font", "package/dist/embed.js": b"/* not needed */",
        "package/dist/embed.js.map": b"{}", "package/dist/embed.js.LICENSE.txt": b"licenses"})
    tgz("requirejs-2.3.8.tgz", {"package/require.js": b"/* require */", "package/bin/r.js": b""})
    return folder


def test_vendor_mode_copies_the_renderer_and_links_it_relatively(small_nbs, tmp_path):
    out = tmp_path / "docs"
    render(small_nbs, out, "--packages-from", str(fake_npm_packages(tmp_path / "packages")))
    static = out / "_static"
    assert (static / "require.js").read_bytes() == b"/* require */"
    assert sorted(p.name for p in (static / "html-manager").iterdir()) == [
        "abc123.woff2", "embed-amd.js", "embed.js.LICENSE.txt"]
    top, nested = (out / "index.html").read_text(), (out / "examples" / "widget_example.html").read_text()
    assert '<script src="_static/require.js"></script>' in top
    assert '<script src="../_static/require.js"></script>' in nested
    assert "'../_static/html-manager/embed-amd.js'" in nested and "unpkg.com" not in nested
    # vendored once: a second run needs no packages at all
    render(small_nbs, out, "--packages-from", str(tmp_path / "nowhere"))


def test_vendor_mode_without_packages_says_what_to_do(small_nbs, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--nbs", str(small_nbs), "--out", str(tmp_path / "docs"),
                           "--packages-from", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0
    assert "jupyter-widgets-html-manager-1.0.15.tgz is missing" in done.stderr


def test_no_notebooks_is_an_error(tmp_path):
    (tmp_path / "nbs").mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), "--nbs", str(tmp_path / "nbs"), "--out", str(tmp_path / "d"),
                           "--widgets", "cdn"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "no notebooks" in done.stderr
