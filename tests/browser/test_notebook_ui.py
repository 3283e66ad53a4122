"""The notebook experience in a real browser: JupyterLab + headless Chromium run `notebook_under_test.ipynb`.

One module-scoped run opens the notebook, runs all cells and watches the page while the fit runs (a
MutationObserver records every progress bar the page renders; the live views are read at the two points where the
notebook's `Gate` holds the fit until this test says go); the tests then check what was seen. Screenshots of each state go to tests/output/browser/test_notebook_ui/."""
from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).parent

NOTEBOOK = HERE / "notebook_under_test.ipynb"
OPEN_TIMEOUT = 120  # s: page load, and kernel start
RUN_TIMEOUT = 150  # s: all cells, fit included
POLL = 0.2  # s between two checks for the notebook's next gate file or its end
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# the notebook panel of our notebook, whichever widget has the focus
PANEL = """(() => {
  const app = window.jupyterapp;
  if (!app) return null;
  for (const w of app.shell.widgets('main')) if (w.context && w.context.path === %s && w.content) return w;
  return null;
})()""" % json.dumps(NOTEBOOK.name)

MARK_CELLS_JS = """() => {
  const panel = %s;
  const names = [];
  panel.content.widgets.forEach((cell, i) => {
    const m = /^# browser-test: ([\\w-]+)/.exec(cell.model.sharedModel.getSource());
    cell.node.dataset.cellIndex = String(i);
    if (m) { cell.node.dataset.browserTest = m[1]; names.push(m[1]); }
  });
  return names;
}"""

# every rendering of a cell's outputs that holds <progress> elements, as [[value, max], ...] in page order
OBSERVE_PROGRESS_JS = """(name) => {
  const cell = document.querySelector(`[data-browser-test="${name}"]`);
  const seen = window.__progressSeen = [];
  const t0 = performance.now();
  new MutationObserver(records => {
    for (const r of records) {
      const bars = [];
      for (const n of r.addedNodes) {
        if (n.nodeType !== Node.ELEMENT_NODE) continue;
        if (n.matches('progress')) bars.push(n);
        bars.push(...n.querySelectorAll('progress'));
      }
      if (bars.length) seen.push({t: (performance.now() - t0) / 1000,
        bars: bars.map(b => [b.getAttribute('value'), b.getAttribute('max')])});
    }
  }).observe(cell, {childList: true, subtree: true});
}"""

CELL_STATES_JS = """() => {
  const panel = %s;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {kernel: kernel ? kernel.status : null, cells: panel.content.widgets.map(c => {
    const code = c.model.type === 'code';
    const prompt = c.node.querySelector('.jp-InputPrompt');
    return {type: c.model.type, name: c.node.dataset.browserTest || null,
            count: code ? c.model.executionCount : null,
            busy: code && prompt ? prompt.textContent.includes('*') : false,
            errors: code ? c.model.outputs.toJSON().filter(o => o.output_type === 'error') : []};
  })};
}"""

# the inspector widget as data: its grid (event names, times fired, one row per callback), dropdown and table
READ_INSPECTOR_JS = """() => {
  const out = document.querySelector('[data-browser-test="inspector"] .jp-OutputArea-output');
  const grid = out && out.querySelector('.widget-gridbox');
  if (!grid) return null;
  const kids = Array.from(grid.children);
  const text = kids.map(k => k.innerText.trim());
  const at = text.indexOf('times fired');
  if (at < 0) return {events: [], counts: [], rows: []};
  const events = text.slice(2, at - 1), width = events.length + 2;
  const rows = [];
  for (let i = at - 1 + width; i + width <= kids.length; i += width) {
    const box = kids[i].querySelector('input[type=checkbox]');
    rows.push({name: text[i + 1], checked: box ? box.checked : null, cells: text.slice(i + 2, i + width)});
  }
  const select = out.querySelector('select');
  const tables = Array.from(out.querySelectorAll('table')).map(t => t.innerText);
  return {events, counts: text.slice(at + 1, at + 1 + events.length).map(Number), rows,
          options: select ? Array.from(select.options).map(o => o.value) : null,
          selected: select ? select.value : null, table: tables.join('\\n')};
}"""


@dataclass
class Run:
    "What the browser saw while the notebook ran."
    cells: list[dict] = field(default_factory=list)  # final state of each cell (type, name, count, errors)
    progress: list[dict] = field(default_factory=list)  # every progress-bar rendering in the fit cell
    samples: list[dict] = field(default_factory=list)  # looks at the live views at each gate, while the fit was held
    seconds: float = 0.0
    screenshots: dict[str, Path] = field(default_factory=dict)


def cell(page, name: str):
    "The DOM node of the cell whose source starts with `# browser-test: name`."
    return page.locator(f'[data-browser-test="{name}"]')


def outputs(page, name: str):
    return cell(page, name).locator(".jp-OutputArea-output")


def error_text(errors: list[dict]) -> str:
    return "\n".join(ANSI.sub("", "\n".join(e.get("traceback") or [f"{e['ename']}: {e['evalue']}"])) for e in errors)


def fit_running(state: dict) -> bool:
    "Whether the fit cell is the one running (not just queued): its prompt is busy and every cell above has run."
    cells = state["cells"]
    fit = next(i for i, c in enumerate(cells) if c["name"] == "fit")
    return cells[fit]["busy"] and all(c["count"] is not None for c in cells[:fit] if c["type"] == "code")


# the PNG images in a cell's outputs, each as [a hash of its src, naturalWidth, naturalHeight]
IMAGES_JS = """(name) => Array.from(document.querySelectorAll(
    `[data-browser-test="${name}"] .jp-OutputArea-output img[src^="data:image/png"]`)).map(img => {
  let h = 0;
  for (let i = 0; i < img.src.length; i++) h = (Math.imul(h, 31) + img.src.charCodeAt(i)) | 0;
  return [h, img.naturalWidth, img.naturalHeight];
})"""

# one look at the page, read in one go (so the cell states and the live views are from the same moment)
LOOK_JS = (f"() => ({{state: ({CELL_STATES_JS % PANEL})(), inspector: ({READ_INSPECTOR_JS})(), "
           f"images: ({IMAGES_JS})('fit')}})")


@pytest.fixture(scope="module")
def page(lab_server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(OPEN_TIMEOUT * 1000)
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.console_errors = console  # reported when the run times out
    yield page
    context.close()


@pytest.fixture(scope="module")
def run(page, lab_server, output_dir, digits_lengths) -> Run:
    "Open the notebook, run all cells, and record what the page showed on the way."
    seen = Run()
    def shot(name: str) -> None:
        seen.screenshots[name] = output_dir / f"{name}.png"
        page.screenshot(path=seen.screenshots[name])

    page.goto(lab_server.lab_url(NOTEBOOK.name))
    page.wait_for_function(f"() => {{ const p = {PANEL}; "
                           "return p !== null && p.content.widgets.length > 0 && p.context.isReady; }")
    names = page.evaluate(MARK_CELLS_JS % PANEL)
    assert {"fit", "done"} <= set(names), f"the notebook's cells should be marked '# browser-test: NAME'; found {names}"
    page.wait_for_function(f"""async () => {{ const p = {PANEL}; await p.sessionContext.ready;
        const k = p.sessionContext.session && p.sessionContext.session.kernel; return k !== null && k.status === 'idle'; }}""")
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # more room for the notebook in screenshots
    shot("01_opened")
    page.evaluate(OBSERVE_PROGRESS_JS, "fit")
    gate = lab_server.root_dir / "gate"  # the notebook's Gate holds the fit at two steps while this folder exists
    gate.mkdir()
    # not awaited: the command's promise settles only when every cell has run
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

    start, state = time.monotonic(), None
    def wait_for_the_notebook(until: str, ready) -> None:
        "Check the page until `ready()` is true, failing at once if a cell raised and after RUN_TIMEOUT."
        nonlocal state
        while True:
            state = page.evaluate(f"() => ({CELL_STATES_JS % PANEL})()")
            errors = [e for c in state["cells"] for e in c["errors"]]
            if errors:
                shot("99_error")
                pytest.fail(f"the notebook raised while running:\n{error_text(errors)}", pytrace=False)
            if ready(): return
            if time.monotonic() - start > RUN_TIMEOUT:
                shot("99_timeout")
                pytest.fail(f"the notebook did not reach {until} within {RUN_TIMEOUT} s; cells: {state['cells']}; "
                            f"browser console errors: {page.console_errors[-20:]}", pytrace=False)
            time.sleep(POLL)

    train_batches, valid_batches = digits_lengths
    for n in (1, 2):
        paused = gate / f"paused-{n}"
        wait_for_the_notebook(f"gate {n}", paused.exists)
        step = int(paused.read_text())  # held at the training batch_end of this step: count the batch_ends so far
        epochs_done, batch = divmod(step - 1, train_batches)
        batch_ends = epochs_done * (train_batches + valid_batches) + batch + 1
        page.wait_for_function(f"() => {{ const s = ({READ_INSPECTOR_JS})(); return s !== null && "
                               f"s.counts[{EVENTS.index('batch_end')}] === {batch_ends}; }}", timeout=30_000)
        before = seen.samples[-1]["images"] if seen.samples else []  # a newer loss plot (an epoch ended since)
        page.wait_for_function(f"(before) => {{ const images = ({IMAGES_JS})('fit'); return images.length === 1 "
                               f"&& JSON.stringify(images) !== JSON.stringify(before); }}", arg=before, timeout=30_000)
        look = page.evaluate(LOOK_JS)
        assert fit_running(look["state"]), f"at gate {n} the fit cell should be the one running: {look['state']}"
        seen.samples.append({"step": step, "batch_ends": batch_ends, "inspector": look["inspector"],
                             "images": look["images"]})
        cell(page, "inspector").evaluate("n => n.scrollIntoView({block: 'start'})")
        shot(f"0{1 + n}_during_fit")
        (gate / f"go-{n}").write_text("")
    def finished() -> bool:
        done = next(c for c in state["cells"] if c["name"] == "done")
        return done["count"] is not None and not done["busy"] and state["kernel"] == "idle"
    wait_for_the_notebook("its end", finished)
    seen.seconds = time.monotonic() - start
    seen.cells = state["cells"]
    seen.progress = page.evaluate("() => window.__progressSeen")
    cell(page, "fit").scroll_into_view_if_needed()
    shot("04_finished")
    for name in ("schedule", "inspector", "fit", "done"):
        path = output_dir / f"cell_{name}.png"
        cell(page, name).screenshot(path=path)
        seen.screenshots[f"cell_{name}"] = path
    print(f"\nnotebook ran in {seen.seconds:.1f} s; {len(seen.samples)} looks while the fit was held; "
          f"screenshots in {output_dir}")
    return seen


def printed(page, key: str):
    "A value the kernel printed as `KEY <json>` in the 'done' cell: the notebook's own account of the fit."
    text = outputs(page, "done").all_inner_texts()
    line = next((l for t in text for l in t.splitlines() if l.startswith(key + " ")), None)
    assert line is not None, f"the 'done' cell printed no {key} line: {text}"
    return json.loads(line[len(key) + 1:])


def history_from_page(page) -> list[dict]:
    return printed(page, "HISTORY")


@pytest.fixture(scope="module")
def digits_lengths() -> tuple[int, int]:
    "Batches per epoch of the notebook's data, training and validation, computed here independently of the page."
    from trainloop_nb.data import Digits
    data = Digits(batch_size=64)
    return len(data.training), len(data.validation)


def test_notebook_runs_without_errors(run, page, digits_lengths):
    code = [c for c in run.cells if c["type"] == "code"]
    assert all(c["count"] is not None for c in code), f"cells left unrun: {[c for c in code if c['count'] is None]}"
    counts = [c["count"] for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"cells ran out of order: {counts}"
    assert "NOTEBOOK DONE" in "\n".join(outputs(page, "done").all_inner_texts())
    kernel_python = Path(printed(page, "PYTHON"))
    assert kernel_python.parent == Path(sys.executable).parent, (
        f"the kernel should run this venv's python ({sys.executable}), it ran {kernel_python}")
    train = digits_lengths[0]
    assert [s["step"] for s in run.samples] == [train + train // 2, 3 * train + train // 2], "held at both gates"


def test_progress_bars_advance_and_finish(run, page, digits_lengths):
    epochs = len(history_from_page(page))
    phase_lengths = set(digits_lengths)
    renders = [[(float(v or 0), float(m)) for v, m in r["bars"]] for r in run.progress]
    assert renders, "no <progress> element was ever rendered in the fit cell's output"
    nested = [r for r in renders if len(r) == 2]
    assert nested, f"the epoch bar never showed a phase bar under it; renderings: {renders[:10]}"
    epoch_values = {v for (v, m), _ in nested if m == epochs}
    assert all((m == epochs) for (v, m), _ in nested), f"the outer bar should count {epochs} epochs: {nested[:5]}"
    assert epoch_values == set(range(epochs)), f"the epoch bar should step through 0..{epochs - 1}, saw {epoch_values}"
    finished = {m for _, (v, m) in nested if v == m}
    assert finished == phase_lengths, (f"each phase bar should be rendered full (value == max) at its end: phase "
                                       f"lengths {phase_lengths}, full bars seen for {finished}")
    partial = [(v, m) for _, (v, m) in nested if 0 < v < m]
    assert partial, "no phase bar was ever seen part way: the bars did not update while the fit ran"
    # at the end fastprogress replaces the bars by the epoch table: no bar is left, none was interrupted
    fit = cell(page, "fit")
    assert fit.locator(".jp-OutputArea-output progress").count() == 0
    assert fit.locator(".progress-bar-interrupted").count() == 0
    assert "Interrupted" not in fit.inner_text()


def test_epoch_table_matches_history(run, page):
    history = history_from_page(page)
    tables = outputs(page, "fit").locator("table")
    assert tables.count() == 1, f"expected one epoch table in the fit's output, found {tables.count()}"
    table = tables.first
    header = [t.strip() for t in table.locator("thead th").all_inner_texts()]
    assert header == ["epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "time"]
    rows = [[t.strip() for t in row.locator("td").all_inner_texts()] for row in table.locator("tbody tr").all()]
    assert len(rows) == len(history)
    for row, record in zip(rows, history):
        cells = dict(zip(header, row))
        assert int(cells["epoch"]) == record["epoch"]
        for name in header[1:-1]:
            assert math.isclose(float(cells[name]), record[name], abs_tol=1e-6), (name, cells, record)
        assert re.fullmatch(r"\d\d:\d\d", cells["time"])
    assert history[-1]["train_loss"] < history[0]["train_loss"], "the model should learn something"


def test_screenshots_saved(run):
    for name, path in run.screenshots.items():
        assert path.exists() and path.stat().st_size > 1000, f"screenshot {name} missing or empty: {path}"
    assert any(n.endswith("during_fit") for n in run.screenshots), "no screenshot was taken while the fit ran"


def test_schedule_plot_is_shown(run, page):
    images = outputs(page, "schedule").locator('img[src^="data:image/png"]')
    assert images.count() == 1, f"expected the schedule plot as one PNG image, found {images.count()}"
    size = images.first.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert size[0] and size[1] > 200 and size[2] > 100, f"the schedule image did not decode to a plot: {size}"


EVENTS = ["fit_start", "epoch_start", "training_start", "batch_start", "update_start", "inference_prediction_end",
          "batch_end", "training_end", "validation_start", "validation_end", "record_added", "epoch_end", "fit_end"]


def expected_counts(epochs: int, train: int, valid: int) -> dict[str, int]:
    "How often each event fires in a fit of `epochs` epochs with `train` and `valid` batches each."
    per_epoch = dict.fromkeys(["epoch_start", "training_start", "training_end", "validation_start",
                               "validation_end", "record_added", "epoch_end"], 1)
    per_epoch.update(batch_start=train + valid, batch_end=train + valid, update_start=train,
                     inference_prediction_end=valid)
    return {"fit_start": 1, "fit_end": 1, **{e: n * epochs for e, n in per_epoch.items()}}


def inspector_now(page) -> dict:
    state = page.evaluate(READ_INSPECTOR_JS)
    assert state is not None, "the inspector's grid (an ipywidgets GridBox) is not in the page"
    return state


def test_inspector_grid_renders(run, page):
    state = inspector_now(page)
    assert state["events"] == EVENTS, f"the grid's columns should be the events in firing order: {state['events']}"
    names = [r["name"] for r in state["rows"]]
    for expected in ["ProgressPrinter", "LearningRateScheduler", "Gate", "CallbackInspector"]:
        assert expected in names, f"no grid row for {expected}: rows {names}"
    assert all(r["checked"] is True for r in state["rows"]), f"each callback should have a ticked checkbox: {state['rows']}"
    assert state["options"] == EVENTS and state["selected"] in EVENTS, f"event dropdown: {state['options']}"
    gate = next(r for r in state["rows"] if r["name"] == "Gate")
    handled = {e for e, text in zip(EVENTS, gate["cells"]) if text}
    assert handled == {"batch_end"}, f"Gate handles batch_end only, the grid shows {handled}"


def test_inspector_counts_match_the_fit(run, page, digits_lengths):
    epochs = len(history_from_page(page))
    expected = expected_counts(epochs, *digits_lengths)
    assert printed(page, "COUNTS") == expected, "the inspector's own counts disagree with the loop's structure"
    shown = dict(zip(EVENTS, inspector_now(page)["counts"]))
    assert shown == expected, f"the widget shows {shown}, the fit fired {expected}"


def test_inspector_counts_change_while_the_fit_runs(run, page):
    "At each gate the widget showed exactly the batch_end events fired so far (the run waited for that), then grew."
    shown = [dict(zip(l["events"], l["counts"]))["batch_end"] for l in (s["inspector"] for s in run.samples)]
    assert shown == [s["batch_ends"] for s in run.samples], f"the widget at the gates: {shown}"
    final = dict(zip(EVENTS, inspector_now(page)["counts"]))["batch_end"]
    assert 0 < shown[0] < shown[1] < final, f"counts seen while the fit was held: {shown}, final {final}"


def test_inspector_dropdown_and_checkbox_talk_to_the_kernel(run, page, output_dir):
    "The controls work in a real browser: the dropdown picks the timings table, a checkbox switches a callback off."
    out = outputs(page, "inspector")
    out.locator("select").select_option("record_added")
    # the batch_end table (the default) lists Gate; record_added's does not, and has one call per epoch
    page.wait_for_function(f"() => !({READ_INSPECTOR_JS})().table.includes('Gate')", timeout=30_000)
    epochs = len(history_from_page(page))
    table = inspector_now(page)["table"]
    printer = next((l.split("\t") for l in table.splitlines() if l.startswith("ProgressPrinter")), None)
    assert printer is not None and int(printer[1]) == epochs, f"record_added timings table: {table}"
    rows = inspector_now(page)["rows"]
    gate = next(i for i, r in enumerate(rows) if r["name"] == "Gate")
    out.locator(".widget-gridbox input[type=checkbox]").nth(gate).click()
    page.wait_for_function(f"""() => {{ const r = ({READ_INSPECTOR_JS})().rows[{gate}];
        return r.checked === false && r.cells[{EVENTS.index("batch_end")}].includes('○'); }}""", timeout=30_000)
    out.screenshot(path=output_dir / "inspector_after_clicks.png")


def test_live_loss_plot_updates_during_the_fit_and_stays(run, page, digits_lengths):
    looks = [tuple(map(tuple, s["images"])) for s in run.samples]
    # the run waited at each gate for one picture, a newer one at the second: an epoch had ended (and drawn) since
    assert len(looks) == 2 and all(len(images) == 1 for images in looks) and looks[0] != looks[1], looks
    final = page.evaluate(IMAGES_JS, "fit")
    assert len(final) == 1, f"after the fit the fit cell should show one loss plot, found {len(final)} images"
    _, width, height = final[0]
    assert width > 200 and height > 100, f"the loss plot did not decode to a picture: {final}"
    first = next(images[0] for images in looks if images)
    assert tuple(final[0]) != first, "the plot after the fit should not be the first one drawn: it did not grow"
    epochs = len(history_from_page(page))
    assert printed(page, "PLOT") == {"epochs": list(range(1, epochs + 1)), "steps": epochs * digits_lengths[0]}
    outputs(page, "fit").locator("img").first.screenshot(path=run.screenshots["04_finished"].parent / "loss_plot.png")
