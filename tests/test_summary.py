"""model_summary and summarize_loop (loop.summary()): counts against torch's own, shapes against the real forward
pass, the model left exactly as it was, and the text and HTML views."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from trainloop_nb.data import Digits, TrainingEpochs
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.models import LeNet
from trainloop_nb.summary import ModelSummary, format_shape, model_summary, summarize_loop


def count(params) -> int: return sum(p.numel() for p in params)


class TransformerLM(nn.Module):
    "A causal transformer with its output layer tied to the embedding (the seed's WikiText-2 example model)."
    def __init__(self, vocab_size: int, context: int, width: int = 128, heads: int = 4, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.token, self.position = nn.Embedding(vocab_size, width), nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.token.weight
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.token(tokens) + self.position(torch.arange(t, device=tokens.device))
        x = self.layers(x, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def state_of(model: nn.Module) -> dict:
    "Everything model_summary must leave alone: weights, buffers, gradients, modes, requires_grad."
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            "modes": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()]}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["modes"] == b["modes"] and a["requires_grad"] == b["requires_grad"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]: assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grads"]:
        assert (a["grads"][k] is None) == (b["grads"][k] is None), k
        if a["grads"][k] is not None: assert torch.equal(a["grads"][k], b["grads"][k]), k


def test_resnet18_counts_and_shapes_match_torch():
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(2, 3, 64, 64)
    s = model_summary(model, x)
    assert s.total == count(model.parameters()) == 11_689_512  # torchvision's documented count
    assert s.trainable == s.total and s.frozen == 0
    assert s.size_bytes == 4 * s.total and math.isclose(s.size_mib, s.total * 4 / 2**20)
    rows = {r.name: r for r in s.rows}
    assert list(rows) == [n for n, _ in model.named_modules() if n]
    for name, module in model.named_modules():
        if name: assert rows[name].parameters == count(module.parameters()), name
    # shapes from an independent pass with our own hooks
    with torch.no_grad():
        model.eval()
        feats = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l1 = model.layer1(feats); l4 = model.layer4(model.layer3(model.layer2(l1)))
    assert rows["maxpool"].output_shape == tuple(feats.shape)
    assert rows["layer1"].output_shape == tuple(l1.shape) and rows["layer4"].output_shape == tuple(l4.shape)
    assert rows["layer1.0.conv1"].depth == 3 and rows["fc"].output_shape == (2, 1000)
    assert rows["layer1.0.relu"].calls == 2  # a BasicBlock uses its ReLU twice
    assert s.output_shape == (2, 1000) and s.input_shape == (2, 3, 64, 64)


def test_resnet18_left_unchanged_in_train_mode_with_grads():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()  # gradients present, batch-norm statistics moved
    model.layer1.eval()  # a block a user froze in eval mode stays in eval mode
    before = state_of(model)
    x = torch.randn(4, 3, 32, 32) * 10 + 5  # would move the BN statistics in train mode
    rng = torch.get_rng_state()
    model_summary(model, x)
    assert_same_state(before, state_of(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_transformer_tied_weights_counted_once():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=100, context=16)
    tokens = torch.randint(0, 100, (3, 16))
    s = model_summary(model, tokens)
    assert s.total == count(model.parameters())
    assert s.total < sum(count(m.parameters(recurse=False)) for m in model.modules())  # the naive count is larger
    assert s.shared == 100 * 128  # the embedding matrix, held by token and head
    rows = {r.name: r for r in s.rows}
    assert rows["head"].parameters == rows["token"].parameters == 100 * 128
    assert rows["head"].output_shape == (3, 16, 100) and s.output_shape == (3, 16, 100)
    assert rows["layers.layers.0"].depth == 3
    assert "shared between modules" in str(s)


def test_frozen_layer_nested_and_partly_trainable():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6)), nn.Linear(6, 2))
    model[0][0].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    s = model_summary(model, torch.randn(7, 4))
    assert s.frozen == 25 + 2 and s.trainable == 36 + 12
    assert s.total == count(model.parameters())
    rows = {r.name: r for r in s.rows}
    assert rows["0.0"].trainable is False and rows["0.2"].trainable is True and rows["0.1"].trainable is None
    assert rows["0"].trainable == "partly" and rows["1"].trainable == "partly"
    assert rows["0"].parameters == 25 + 36 and rows["0.2"].output_shape == (7, 6)
    assert [r.depth for r in s.rows] == [1, 2, 2, 2, 1]
    shallow = model_summary(model, torch.randn(7, 4), max_depth=1)
    assert [r.name for r in shallow.rows] == ["0", "1"] and shallow.total == s.total


def test_shared_module_listed_once_with_its_calls():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    s = model_summary(model, torch.randn(2, 3))
    assert [r.name for r in s.rows] == ["0", "1"]  # named_modules lists a module once
    assert s.rows[0].calls == 2 and s.total == 12
    assert "×2" in str(s)


def test_unused_module_and_several_outputs():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.unused = nn.LSTM(4, 5, batch_first=True), nn.Linear(2, 2)
        def forward(self, x): return self.lstm(x)
    s = model_summary(Odd(), torch.randn(2, 3, 4))
    rows = {r.name: r for r in s.rows}
    assert rows["lstm"].output_shape == ((2, 3, 5), ((1, 2, 5), (1, 2, 5)))
    assert format_shape(rows["lstm"].output_shape) == "([2, 3, 5], ([1, 2, 5], [1, 2, 5]))"
    assert rows["unused"].calls == 0 and "(not run)" in str(s)


def test_half_precision_size():
    model = nn.Linear(10, 10).to(torch.float16)
    s = model_summary(model, torch.randn(1, 10, dtype=torch.float16)) if torch.cuda.is_available() else None
    s = s or model_summary(nn.Linear(10, 10).to(torch.bfloat16), torch.randn(1, 10, dtype=torch.bfloat16))
    assert s.size_bytes == 2 * 110 and s.dtypes in (["float16"], ["bfloat16"])


def test_text_and_html_views():
    model = LeNet(in_channels=1, num_classes=10, image_size=8)
    s = model_summary(model, torch.randn(5, 1, 8, 8))
    text = str(s)
    assert text == repr(s)
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("Layer (type)"))
    columns = [header.index(c) for c in ("Output shape", "Parameters", "Trains")]
    row = next(l for l in lines if l.startswith("  classifier.1 (Linear)"))
    assert row[columns[0]:].startswith("[5, 120]")  # the shape column is aligned
    assert row[:columns[2]].rstrip().endswith("7,800")  # numbers right-aligned under their header's end
    assert f"Total parameters: {s.total:,}" in text and "Frozen parameters: 0" in text and "MiB (float32)" in text
    html = s._repr_html_()
    for r in s.rows: assert r.name in html
    assert html.count("<tr>") == 1 + len(s.rows) + 4


def test_bad_arguments_say_what_to_do():
    with pytest.raises(TypeError, match="torch.nn.Module"): model_summary("model", torch.zeros(1))
    with pytest.raises(ValueError, match="max_depth"): model_summary(nn.Linear(2, 2), torch.zeros(1, 2), max_depth=0)
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError) as info: model_summary(model, torch.zeros(4, 5))
    assert any("give it an input as the model takes it" in n for n in getattr(info.value, "__notes__", []))
    assert not model._forward_hooks  # hooks removed after the failure


def test_summarize_loop_uses_the_first_batch_and_keeps_the_data_where_it_was():
    data = Digits(batch_size=32)
    model = LeNet(in_channels=1, num_classes=10, image_size=8)
    loop = TrainingLoop(data.training, data.validation, torch.optim.SGD(model.parameters(), lr=0.1),
                        include_default_callbacks=False)
    with pytest.raises(ValueError, match=r"loop.summary\(model=model\)"): summarize_loop(loop)
    rng = torch.get_rng_state()
    s = summarize_loop(loop, model=model)
    assert isinstance(s, ModelSummary) and s.input_shape == (32, 1, 8, 8) and s.output_shape == (32, 10)
    assert data.training.epoch == 0 and torch.equal(rng, torch.get_rng_state())
    loop.fit(model, epochs=1, device="cpu")
    before = state_of(model)
    assert summarize_loop(loop).total == count(model.parameters())
    assert_same_state(before, state_of(model))
    assert data.training.epoch == 1


def test_summarize_loop_with_a_shuffling_dataloader_keeps_the_global_rng():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True)
    model = nn.Linear(3, 2)
    loop = TrainingLoop(loader, None, torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    assert summarize_loop(loop, model=model).input_shape == (6, 3)
    assert torch.equal(torch.rand(3), expected)
