"""The demo command end to end, and the progress printer in each place its output can go."""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def test_demo_command_reaches_95_percent_and_prints_a_plain_table():
    run = subprocess.run([str(BIN / "trainloop-demo"), "--epochs", "15", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "time"]
    assert [l.split()[0] for l in lines[1:16]] == [str(i) for i in range(1, 16)]
    assert "\r" not in run.stdout and "█" not in run.stdout  # no bar litter in a pipe
    m = re.fullmatch(r"final validation accuracy: (\d\.\d{4})", lines[-1])
    assert m and float(m.group(1)) >= 0.95
    # the printed accuracy is the last table row's
    assert abs(float(lines[15].split()[4]) - float(m.group(1))) < 1e-4
    seconds = float(re.search(r"in ([\d.]+) s", lines[-2]).group(1))
    print(f"demo trained in {seconds} s")


def test_demo_rejects_an_unavailable_device():
    run = subprocess.run([str(BIN / "trainloop-demo"), "--epochs", "1", "--device", "cuda:7"],
                         capture_output=True, text=True, timeout=120)
    if run.returncode == 0: pytest.fail("cuda:7 should not exist on a test machine")
    assert "cuda:7" in run.stderr and ("not available" in run.stderr or "invalid device" in run.stderr.lower())


SCRIPT = """
import torch
from trainloop_nb import *
g = torch.Generator().manual_seed(0)
x = torch.randn(400, 8, generator=g); y = (x[:, 0] > 0).long()
model = torch.nn.Linear(8, 2)
loop = TrainingLoop(TrainingEpochs((x, y), batch_size=20), ValidationBatches((x, y), 100),
                    torch.optim.SGD(model.parameters(), lr=0.1), metrics=["accuracy"])
loop.fit(model, epochs=2)
print("DONE", loop.history[-1]["valid_accuracy"])
"""


def test_terminal_gets_redrawn_bars():
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout is a terminal
        os.execv(sys.executable, [sys.executable, "-c", SCRIPT])
    out, deadline = b"", time.monotonic() + 120
    while True:
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:  # a hung child fails the test instead of hanging the suite
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the script did not end in 120 s; it wrote: {out.decode('utf-8', 'replace')}")
        try: chunk = os.read(fd, 4096)
        except OSError: break
        if not chunk: break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode("utf-8", "replace")
    assert "DONE" in text
    assert "\r" in text and "|" in text and "[20/20" in text  # a bar redrawn in place, finished
    assert re.search(r"(^|\r)epoch\s+train_loss\s+train_accuracy\s+valid_loss\s+valid_accuracy\s+time", text, re.M)


def test_plain_output_has_one_line_per_epoch():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 4 and lines[1].split()[0] == "1" and lines[2].split()[0] == "2"
    assert lines[3].startswith("DONE")


def test_interrupted_fit_says_so_in_plain_mode():
    script = SCRIPT.replace('metrics=["accuracy"])', 'metrics=["accuracy"], callbacks=[lambda l, e: (_ for _ in ()).throw(RuntimeError("x")) if e == "epoch_end" and l.epoch_index == 1 else None])')
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "RuntimeError: x" in run.stderr
    assert "interrupted by RuntimeError in epoch 2" in run.stdout


def test_live_loss_plot_beside_the_printer_draws_the_loss_chart_in_a_script(tmp_path):
    png = tmp_path / "loss.png"
    script = SCRIPT.replace('metrics=["accuracy"])', f'metrics=["accuracy"], callbacks=[LiveLossPlot(path={str(png)!r})])')
    script += "import sys; print('WIDGETS', 'ipywidgets' in sys.modules, 'IPython' in sys.modules)\n"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "WIDGETS False False" in run.stdout
    import matplotlib.image
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3
