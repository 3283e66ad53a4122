"""The static docs (`make docs`) in a browser with the network cut off: saved widgets and plots must still show.

The pages are rendered here into a temporary folder, reusing the widget renderer that `make docs` vendored
into _docs/_static (nothing is downloaded by the tests). Every request that is not a local file is aborted
and recorded; only MathJax, which always comes from its CDN, may ask for the network."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NBS = ROOT / "nbs"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
ALLOWED_REMOTE = ("https://cdnjs.cloudflare.com/ajax/libs/mathjax/",)


def load_render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    render_docs = load_render_docs()
    vendored = ROOT / "_docs" / render_docs.STATIC
    stamp = vendored / "VENDORED"
    if not stamp.exists() or stamp.read_text() != f"{render_docs.HTML_MANAGER}\n{render_docs.REQUIREJS}\n":
        pytest.fail(f"the widget renderer is not vendored in {vendored}: run `make docs` first (it fetches "
                    f"{render_docs.HTML_MANAGER} and {render_docs.REQUIREJS} once with npm); `make test` does that",
                    pytrace=False)
    out = tmp_path_factory.mktemp("docs")
    shutil.copytree(vendored, out / render_docs.STATIC)
    render_docs.render_docs(NBS, out, widgets="vendor")
    return out


@pytest.fixture(scope="module")
def offline_page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    remote: list[str] = []
    context.route(lambda url: not url.startswith(("file:", "data:")),
                  lambda route: (remote.append(route.request.url), route.abort()))
    page = context.new_page()
    page.remote_requests = remote
    page.page_errors = []
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))
    yield page
    context.close()


def widget_notebooks() -> list[Path]:
    return [p for p in sorted(NBS.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts
            and WIDGET_STATE in nbformat.read(p, as_version=4).metadata.get("widgets", {})]


def test_saved_widgets_render_offline(docs, offline_page, output_dir):
    notebooks = widget_notebooks()
    assert notebooks, "no notebook in nbs/ holds saved widget state (08_inspector should)"
    for nb_path in notebooks:
        offline_page.remote_requests.clear()
        offline_page.page_errors.clear()
        page_file = docs / nb_path.relative_to(NBS).with_suffix(".html")
        offline_page.goto(page_file.as_uri())
        views = offline_page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
        assert views > 0, f"{page_file.name} holds no widget view"
        # the html-manager draws each saved view next to its script tag
        offline_page.wait_for_function(
            """() => Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'))
                 .every(s => s.parentElement.querySelector('.lm-Widget, .jupyter-widgets-view, [class*="widget-"]'))""",
            timeout=60_000)
        first = offline_page.locator('script[type="application/vnd.jupyter.widget-view+json"]').first
        first.locator("xpath=..").screenshot(path=output_dir / f"docs_{nb_path.stem}_widget.png")
        text = first.locator("xpath=..").inner_text()
        assert text.strip(), f"the first widget of {page_file.name} rendered empty"
        remote = [u for u in offline_page.remote_requests if not u.startswith(ALLOWED_REMOTE)]
        assert not remote, f"{page_file.name} asked the network for {remote}"
        assert not offline_page.page_errors, f"{page_file.name} raised in the browser: {offline_page.page_errors}"


def test_saved_plots_show_offline(docs, offline_page):
    for nb_path in sorted(NBS.glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        if not pngs: continue
        offline_page.goto((docs / nb_path.with_suffix(".html").name).as_uri())
        sizes = offline_page.eval_on_selector_all(
            'img[src^="data:image/png"]', "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(sizes) == pngs, f"{nb_path.name}: {pngs} saved PNGs, {len(sizes)} images in its page"
        assert all(ok and w > 0 and h > 0 for ok, w, h in sizes), f"{nb_path.name}: images that did not decode {sizes}"
