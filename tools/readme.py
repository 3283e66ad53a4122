#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb, or with --check fail if README.md differs from it.

nbdev_readme needs Quarto, which cannot be installed here, so the front page is kept in step by
this script: markdown cells as they are, code cells as ```python blocks, and their text outputs
(streams, text/markdown or text/plain results) as plain blocks. HTML-only outputs are left out."""
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def cell_outputs(cell) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream": texts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            data = out.get("data", {})
            if "text/markdown" in data: texts.append(("MD", data["text/markdown"]))
            elif "text/plain" in data and "text/html" not in data and "image/png" not in data: texts.append(data["text/plain"])
    return texts


def render(nb) -> str:
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown": parts.append(cell.source.strip())
        elif cell.cell_type == "code":
            source = "\n".join(l for l in cell.source.splitlines() if not l.startswith("#|")).strip()
            if not source: continue
            parts.append(f"```python\n{source}\n```")
            stream = "".join(t for t in cell_outputs(cell) if isinstance(t, str)).rstrip()
            if stream: parts.append(f"```\n{stream}\n```")
            parts += [t[1].strip() for t in cell_outputs(cell) if isinstance(t, tuple)]
    return "<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, then run `make readme`. -->\n\n" \
        + "\n\n".join(parts) + "\n"


def main() -> int:
    text = render(nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4))
    readme = ROOT / "README.md"
    if "--check" in sys.argv:
        if readme.read_text(encoding="utf-8") != text:
            print("README.md is not in step with nbs/index.ipynb: run `make readme` and commit it.", file=sys.stderr)
            return 1
        print("README.md in step with nbs/index.ipynb")
        return 0
    readme.write_text(text, encoding="utf-8")
    print(f"wrote {readme.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
