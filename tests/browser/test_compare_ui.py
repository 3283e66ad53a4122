"""The run picker of `compare_runs`, in a real browser: JupyterLab + headless Chromium run `compare_under_test.ipynb`.

The picker must render its two lists and the plot; choosing metrics and runs in the page must redraw the plot,
and the kernel's figure must then show what was chosen; choosing no metric says so in the page and keeps the
last plot. Screenshots go to tests/output/browser/test_compare_ui/."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
NOTEBOOK = HERE / "compare_under_test.ipynb"
OPEN_TIMEOUT = 120  # s: page load and kernel start
RUN_TIMEOUT = 180  # s: all cells

PANEL = """(() => {
  for (const w of window.jupyterapp.shell.widgets('main')) if (w.context && w.context.path === %s && w.content) return w;
  return null;
})()""" % json.dumps(NOTEBOOK.name)

MARK_CELLS_JS = """() => {
  const panel = %s;
  if (!panel) return null;
  panel.content.widgets.forEach(cell => {
    const m = /^# browser-test: ([\\w-]+)/.exec(cell.model.sharedModel.getSource());
    if (m) cell.node.dataset.browserTest = m[1];
  });
  return panel.content.widgets.length;
}""" % PANEL

STATE_JS = """() => {
  const panel = %s;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {kernel: kernel ? kernel.status : null, cells: panel.content.widgets.filter(c => c.model.type === 'code').map(c => ({
    name: c.node.dataset.browserTest || null, count: c.model.executionCount,
    errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)}))};
}""" % PANEL

# run code in the notebook's kernel and return what it printed (an error as "ERROR name: value")
KERNEL_JS = """async (code) => {
  const kernel = (%s).sessionContext.session.kernel;
  const future = kernel.requestExecute({code, store_history: false});
  let out = '';
  future.onIOPub = msg => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') out += 'ERROR ' + msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return out;
}""" % PANEL

PLOT_SRC_JS = """() => { const img = document.querySelector('[data-browser-test="compare"] .run-picker-plot');
  return img ? img.src : null; }"""


def cell(page, name: str):
    return page.locator(f'[data-browser-test="{name}"]')


def shown(page) -> dict:
    "What the kernel's figure shows now: its axes' titles and the labels of its lines."
    out = page.evaluate(KERNEL_JS, "print(json.dumps(shown()))").strip()
    assert not out.startswith("ERROR"), out
    return json.loads(out)


@pytest.fixture(scope="module")
def page(lab_server, browser, output_dir):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(OPEN_TIMEOUT * 1000)
    page.goto(lab_server.lab_url(NOTEBOOK.name))
    page.wait_for_function(f"() => {{ const p = {PANEL}; return p && p.sessionContext.session "
                           "&& p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }")
    page.evaluate(MARK_CELLS_JS)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    start, state = time.monotonic(), None
    while time.monotonic() - start < RUN_TIMEOUT:
        state = page.evaluate(STATE_JS)
        errors = [e for c in state["cells"] for e in c["errors"]]
        if errors:
            page.screenshot(path=output_dir / "99_error.png")
            pytest.fail(f"the notebook raised: {errors}", pytrace=False)
        done = next(c for c in state["cells"] if c["name"] == "done")
        if done["count"] is not None and state["kernel"] == "idle": break
        time.sleep(0.3)  # polling the page, not synchronising the code under test
    else:
        page.screenshot(path=output_dir / "99_timeout.png")
        pytest.fail(f"the notebook did not finish within {RUN_TIMEOUT} s: {state}", pytrace=False)
    page.screenshot(path=output_dir / "01_finished.png", full_page=True)
    yield page
    context.close()


def test_the_picker_redraws_what_is_chosen_in_the_page(page, output_dir):
    picker = cell(page, "compare").locator(".run-picker")
    picker.wait_for()
    assert shown(page) == {"metrics": ["valid_loss"], "runs": ["lr=0.01", "lr=0.1", "lr=1.0"]}
    runs, metrics = picker.locator(".run-picker-runs select"), picker.locator(".run-picker-metrics select")
    assert runs.locator("option").all_inner_texts() == ["lr=0.01", "lr=0.1", "lr=1.0"]
    options = metrics.locator("option").all_inner_texts()
    assert options == ["train_accuracy", "train_loss", "valid_accuracy", "valid_loss"]
    before = page.evaluate(PLOT_SRC_JS)
    assert before and before.startswith(("data:image/png", "blob:")), before
    picker.screenshot(path=output_dir / "picker_first.png")

    metrics.select_option(["train_loss", "valid_loss"])
    page.wait_for_function(f"(before) => ({PLOT_SRC_JS})() !== before", arg=before, timeout=30_000)
    assert shown(page)["metrics"] == ["train_loss", "valid_loss"]

    two_metrics = page.evaluate(PLOT_SRC_JS)
    runs.select_option(["lr=0.1"])
    page.wait_for_function(f"(before) => ({PLOT_SRC_JS})() !== before", arg=two_metrics, timeout=30_000)
    assert shown(page) == {"metrics": ["train_loss", "valid_loss"], "runs": ["lr=0.1"]}
    picker.screenshot(path=output_dir / "picker_chosen.png")

    metrics.select_option([])  # no metric: a message in the page, the last plot kept, nothing raised in the kernel
    page.wait_for_function("() => document.querySelector('[data-browser-test=\"compare\"] .run-picker-message')"
                           ".innerText.includes('choose at least one metric')", timeout=30_000)
    assert shown(page) == {"metrics": ["train_loss", "valid_loss"], "runs": ["lr=0.1"]}
