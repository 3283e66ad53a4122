"""The Hugging Face examples (nbs/examples/) in their small mode, as nbdev_test runs them but offline: every connection
beyond the machine is refused and recorded, and the home folder is empty, so no Hub cache could stand in for a
download. Then what each trained is checked in the namespace the notebook left."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

EXAMPLES = Path(__file__).resolve().parents[1] / "nbs" / "examples"

# Runs one notebook with execnb (as nbdev_test does) in a fresh process, then prints the JSON of an expression
# evaluated in the notebook's namespace, and the connections that were attempted.
RUNNER = r"""
import json, socket, sys
attempts = []
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo

def connect(self, address):
    if self.family == socket.AF_UNIX: return _connect(self, address)
    attempts.append(repr(address))
    raise ConnectionRefusedError(f"connection to {address!r} refused: the small mode must not use the network")

def getaddrinfo(host, *args, **kwargs):
    if host in (None, "localhost", "127.0.0.1", "::1"): return _getaddrinfo(host, *args, **kwargs)
    attempts.append(repr(host))
    raise socket.gaierror(f"{host!r} refused: the small mode must not use the network")

socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
from execnb.nbio import read_nb
from execnb.shell import CaptureShell

from trainloop_nb.batches import own_loss  # what loss_func=None trains on

shell = CaptureShell()
shell.run_all(read_nb(sys.argv[1]), exc_stop=True)
value = eval(sys.argv[2], {**shell.user_ns, "own_loss": own_loss})
print("RESULT " + json.dumps({"value": value, "attempts": attempts}))
"""


def run_example(name: str, expression: str, home: Path) -> dict:
    "Run nbs/examples/`name` in small mode from its folder with an empty home; `expression`'s value and the attempts."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINLOOP_", "HF_", "TRANSFORMERS_"))}
    env.update(HOME=str(home), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "cache"), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(EXAMPLES.parents[1]), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", RUNNER, str(EXAMPLES / name), expression], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_cola_example_fine_tunes_a_bert_classifier_offline(tmp_path):
    result = run_example("cola_classifier.ipynb", "dict(model=type(model).__name__, own_loss=loop.loss_func is "
                         "own_loss, batch=sorted(batch), mcc=history[-1]['valid_mcc'], steps=loop.step, "
                         "epochs=len(history), tokens=len(tokenizer))", tmp_path)
    assert result["attempts"] == []
    value = result["value"]
    assert value["model"] == "BertForSequenceClassification" and value["own_loss"]
    assert value["batch"] == ["attention_mask", "input_ids", "labels", "token_type_ids"]  # a dict batch, padded
    assert value["epochs"] == 4 and value["steps"] == 4 * 38 and value["mcc"] > 0.5
    assert value["tokens"] < 100  # the small vocabulary, not bert-base-uncased's 30,522


def test_wikitext2_example_trains_gpt2_offline(tmp_path):
    result = run_example("wikitext2_transformer.ipynb", "dict(model=type(model).__name__, own_loss=loop.loss_func is "
                         "own_loss, ppl=history[-1]['valid_next_token_perplexity'], by_hand=valid_ppl, "
                         "vocab=len(vocab), positions=model.config.n_positions, run_dir_left=RUN_DIR.exists())",
                         tmp_path)
    assert result["attempts"] == []
    value = result["value"]
    assert value["model"] == "GPT2LMHeadModel" and value["own_loss"] and value["positions"] == 25
    assert value["ppl"] == pytest.approx(value["by_hand"], rel=1e-4) and value["ppl"] < value["vocab"] / 5
    assert not value["run_dir_left"]  # the generated files and TensorBoard logs removed
