"""What the browser tests of one notebook share: its panel in JupyterLab, running it to its end, its kernel.

`open_and_run` opens the notebook, marks the cells whose source starts with `# browser-test: <name>` (found with
`cell(page, name)`), runs every cell and waits for the one named `done`, failing with a screenshot on an error."""
from __future__ import annotations

import json
import time

import pytest

OPEN_TIMEOUT = 120  # s: page load and kernel start
RUN_TIMEOUT = 180  # s: all cells


class LabNotebook:
    "The JavaScript that finds one notebook's panel and reads its cells and kernel, as a test's page evaluates it."
    def __init__(self, name: str):
        self.panel = _PANEL % json.dumps(name)
        self.name = name
        self.mark_cells_js, self.state_js, self.kernel_js = (js % self.panel for js in (_MARK_CELLS, _STATE, _KERNEL))

    def run_in_kernel(self, page, code: str) -> str:
        "What `code` printed when run in the notebook's kernel (an error fails the test)."
        out = page.evaluate(self.kernel_js, code).strip()
        assert not out.startswith("ERROR"), out
        return out

    def page_fixture(self, height: int):
        "A module-scoped `page` fixture: a browser page that has run every cell of the notebook (see `open_and_run`)."
        @pytest.fixture(scope="module")
        def page(lab_server, browser, output_dir):
            context, page = open_and_run(browser, lab_server, self, self.name, output_dir, height=height)
            yield page
            context.close()
        return page


_PANEL = """(() => {
  for (const w of window.jupyterapp.shell.widgets('main')) if (w.context && w.context.path === %s && w.content) return w;
  return null;
})()"""

_MARK_CELLS = """() => {
  const panel = %s;
  if (!panel) return null;
  panel.content.widgets.forEach(cell => {
    const m = /^# browser-test: ([\\w-]+)/.exec(cell.model.sharedModel.getSource());
    if (m) cell.node.dataset.browserTest = m[1];
  });
  return panel.content.widgets.length;
}"""

_STATE = """() => {
  const panel = %s;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {kernel: kernel ? kernel.status : null, cells: panel.content.widgets.filter(c => c.model.type === 'code').map(c => ({
    name: c.node.dataset.browserTest || null, count: c.model.executionCount,
    errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)}))};
}"""

# code run in the notebook's kernel; what it printed comes back (an error as "ERROR name: value")
_KERNEL = """async (code) => {
  const kernel = (%s).sessionContext.session.kernel;
  const future = kernel.requestExecute({code, store_history: false});
  let out = '';
  future.onIOPub = msg => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') out += 'ERROR ' + msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return out;
}"""


def cell(page, name: str):
    return page.locator(f'[data-browser-test="{name}"]')


def open_and_run(browser, lab_server, notebook: LabNotebook, name: str, output_dir, height: int):
    "A new browser context whose page has run every cell of the notebook `name`; (context, page)."
    context = browser.new_context(viewport={"width": 1280, "height": height})
    page = context.new_page()
    page.set_default_timeout(OPEN_TIMEOUT * 1000)
    page.goto(lab_server.lab_url(name))
    page.wait_for_function(f"() => {{ const p = {notebook.panel}; return p && p.sessionContext.session "
                           "&& p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }")
    page.evaluate(notebook.mark_cells_js)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    start, state = time.monotonic(), None
    while time.monotonic() - start < RUN_TIMEOUT:
        state = page.evaluate(notebook.state_js)
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
    return context, page
