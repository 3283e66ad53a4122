"""A background fit in a real browser: JupyterLab + headless Chromium run `background_under_test.ipynb`.

The fit starts in the background and a later cell runs while it trains; the step counter under the bars moves;
the Pause button stops it (and the kernel's own `loop.step` with it), Resume moves it again, Stop ends the fit
as Ctrl-C would, and a page reload shows the live bars again. Screenshots go to tests/output/browser/test_background_ui/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab_notebook import LabNotebook, cell

HERE = Path(__file__).parent
NOTEBOOK = HERE / "background_under_test.ipynb"
LAB = LabNotebook(NOTEBOOK.name)
WAIT = 60_000  # ms


page = LAB.page_fixture(height=1200)


def shown_step(page) -> int:
    text = cell(page, "start").locator(".trainloop-step").inner_text()
    return int(re.search(r"step (\d+)", text).group(1))


def wait_for_step_past(page, step: int) -> None:
    "Until the step counter under the bars shows more than `step` (Playwright waits on the page's own updates)."
    page.wait_for_function(f"""() => {{ const e = document.querySelector('[data-browser-test="start"] .trainloop-step');
        const m = e && /step (\\d+)/.exec(e.innerText); return m && Number(m[1]) > {step}; }}""", timeout=WAIT)


def status(page):
    return cell(page, "start").locator(".trainloop-status")


def test_buttons_pause_resume_and_stop_the_fit_while_the_kernel_stays_free(page, output_dir):
    done_output = cell(page, "done").locator(".jp-OutputArea-output").inner_text()
    assert "the kernel is free while it trains" in done_output and "done=False" in done_output
    bars = cell(page, "start").locator(".trainloop-live-bars")
    bars.wait_for()
    first = shown_step(page)
    wait_for_step_past(page, first)  # it trains after every cell has run

    cell(page, "start").locator(".trainloop-pause").click()
    page.wait_for_function("() => document.querySelector('[data-browser-test=\"start\"] .trainloop-status')"
                           ".innerText.startsWith('paused')", timeout=WAIT)
    paused = shown_step(page)
    assert int(LAB.run_in_kernel(page, "print(loop.step)")) == paused  # the kernel answers while the fit waits
    assert int(LAB.run_in_kernel(page, "print(loop.step)")) == paused and shown_step(page) == paused
    bars.screenshot(path=output_dir / "02_paused.png")

    cell(page, "start").locator(".trainloop-resume").click()
    wait_for_step_past(page, paused)
    assert status(page).inner_text().startswith("running")

    cell(page, "start").locator(".trainloop-stop").click()
    page.wait_for_function("() => document.querySelector('[data-browser-test=\"start\"] .trainloop-status')"
                           ".innerText.startsWith('stopped')", timeout=WAIT)
    ended = "print(run.done, type(loop.exception).__name__, len(run.wait()) == len(loop.history))"
    assert LAB.run_in_kernel(page, ended) == "True KeyboardInterrupt True"
    bars.screenshot(path=output_dir / "03_stopped.png")


def test_the_live_bars_show_again_after_a_page_reload(page, output_dir):
    stopped_at = int(LAB.run_in_kernel(page, "print(loop.step)"))
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")  # the outputs hold the widget's id
    page.wait_for_function(f"() => !({LAB.panel}).context.model.dirty", timeout=WAIT)
    page.reload()
    page.wait_for_function(f"() => {{ const p = {LAB.panel}; return p && p.sessionContext.session "
                           "&& p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }",
                           timeout=WAIT)
    page.evaluate(LAB.mark_cells_js)
    bars = cell(page, "start").locator(".trainloop-live-bars")
    bars.wait_for(timeout=WAIT)
    assert shown_step(page) == stopped_at and status(page).inner_text().startswith("stopped")
    page.screenshot(path=output_dir / "04_reloaded.png")
