"""The run picker of `compare_runs`, in a real browser: JupyterLab + headless Chromium run `compare_under_test.ipynb`.

The picker must render its two lists and the plot; choosing metrics and runs in the page must redraw the plot,
and the kernel's figure must then show what was chosen; choosing no metric says so in the page and keeps the
last plot. Screenshots go to tests/output/browser/test_compare_ui/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab_notebook import LabNotebook, cell

HERE = Path(__file__).parent
NOTEBOOK = HERE / "compare_under_test.ipynb"
LAB = LabNotebook(NOTEBOOK.name)

PLOT_SRC_JS = """() => { const img = document.querySelector('[data-browser-test="compare"] .run-picker-plot');
  return img ? img.src : null; }"""


def shown(page) -> dict:
    "What the kernel's figure shows now: its axes' titles and the labels of its lines."
    return json.loads(LAB.run_in_kernel(page, "print(json.dumps(shown()))"))


page = LAB.page_fixture(height=1400)


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
