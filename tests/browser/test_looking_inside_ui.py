"""Looking inside, in a real browser: JupyterLab + headless Chromium run `looking_inside_under_test.ipynb`.

The model summary must render as an HTML table and the confusion matrix as an image; the schedule designer's
plot must change when a rate is edited in the page, show a refused schedule's message inline, and the kernel's
`designer.code()` must reflect the edit. Screenshots go to tests/output/browser/test_looking_inside_ui/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab_notebook import LabNotebook, cell

HERE = Path(__file__).parent
NOTEBOOK = HERE / "looking_inside_under_test.ipynb"
LAB = LabNotebook(NOTEBOOK.name)

PLOT_SRC_JS = """() => { const img = document.querySelector('[data-browser-test="designer"] .designer-plot');
  return img ? img.src : null; }"""


def printed(page, key: str):
    text = "\n".join(cell(page, "done").locator(".jp-OutputArea-output").all_inner_texts())
    line = next((l for l in text.splitlines() if l.startswith(key + " ")), None)
    assert line is not None, f"the 'done' cell printed no {key} line: {text}"
    return json.loads(line[len(key) + 1:])


page = LAB.page_fixture(height=1600)


def test_summary_table_renders(page, output_dir):
    expected = printed(page, "SUMMARY")
    out = cell(page, "summary").locator(".jp-OutputArea-output")
    table = out.locator("table.model-summary-layers")
    assert table.count() == 1, "the summary should render as one HTML table of layers"
    header = [t.strip() for t in table.locator("thead th").all_inner_texts()]
    assert header == ["Layer (type)", "Output shape", "Parameters", "Trains"]
    names = [t.split(" (")[0].strip() for t in table.locator("tbody tr td:first-child").all_inner_texts()]
    assert names == expected["rows"]
    totals = dict(tuple(t.strip() for t in row.locator("th, td").all_inner_texts())
                  for row in out.locator("table.model-summary-totals tr").all())
    assert int(totals["Total parameters"].replace(",", "")) == expected["total"]
    # nested rows are indented further than their parents in the page
    first, nested = (table.locator("tbody tr").nth(i).locator("td").first.evaluate(
        "td => parseFloat(getComputedStyle(td).paddingLeft)") for i in (0, 1))
    assert nested > first
    out.screenshot(path=output_dir / "summary.png")


def test_confusion_matrix_renders(page, output_dir):
    images = cell(page, "confusion").locator('.jp-OutputArea-output img[src^="data:image/png"]')
    assert images.count() == 1, f"expected the confusion matrix as one PNG image, found {images.count()}"
    complete, width, height = images.first.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert complete and width > 200 and height > 200
    matrix = printed(page, "MATRIX")
    assert len(matrix) == 10 and all(len(r) == 10 for r in matrix) and sum(map(sum, matrix)) > 300
    images.first.screenshot(path=output_dir / "confusion_matrix.png")


def test_designer_plot_follows_edits_and_code_reflects_them(page, output_dir):
    designer = cell(page, "designer").locator(".schedule-designer")
    designer.wait_for()
    assert designer.locator(".designer-segment").count() == 2
    assert printed(page, "CODE").startswith("make_schedule([ScheduleSegment(linear, start_rate=0.0, end_rate=0.1")
    before = page.evaluate(PLOT_SRC_JS)
    assert before and before.startswith(("data:image/png", "blob:")), before
    end = designer.locator(".designer-segment").nth(0).locator(".designer-end input")
    end.fill("0.05")
    end.press("Enter")
    page.wait_for_function(f"(before) => ({PLOT_SRC_JS})() !== before", arg=before, timeout=30_000)
    designer.screenshot(path=output_dir / "designer_edited.png")
    code = LAB.run_in_kernel(page, "print(designer.code())")
    assert code == ("make_schedule([ScheduleSegment(linear, start_rate=0.0, end_rate=0.05, step_count=11), "
                    "ScheduleSegment(cosine, end_rate=0.0)])"), code
    assert "0.05" in designer.locator(".designer-code").inner_text()
    # a schedule make_schedule refuses: its message in the page, nothing raised in the kernel
    valid_plot = page.evaluate(PLOT_SRC_JS)
    shape = designer.locator(".designer-segment").nth(1).locator(".designer-shape select")
    shape.select_option("exponential")
    message = designer.locator(".designer-message")
    page.wait_for_function("() => document.querySelector('[data-browser-test=\"designer\"] .designer-message')"
                           ".innerText.includes('cannot end at 0')", timeout=30_000)
    assert "exponential" in message.inner_text()
    page.wait_for_function(f"(before) => ({PLOT_SRC_JS})() !== before", arg=valid_plot, timeout=30_000)  # greyed
    assert LAB.run_in_kernel(page, "print(designer.error is not None)") == "True"
    designer.screenshot(path=output_dir / "designer_refused.png")
