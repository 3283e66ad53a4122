"""Hugging Face models and batches (issue 21): transformers models built from tiny configs (nothing is downloaded),
trained on mapping batches with their own loss or the loop's; `history` against the models' own losses computed by
hand over the same batches, accuracies against scikit-learn; summary, interpret and lr_find on them."""
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from transformers import BatchEncoding, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402

from trainloop_nb.loop import TrainingLoop  # noqa: E402
from trainloop_nb.losses import softmax_cross_entropy  # noqa: E402

transformers.utils.logging.set_verbosity_error()
VOCAB = 30


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=37, num_labels=2))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      use_cache=False, bos_token_id=0, eos_token_id=0))


def sentence_dataset(n, seed):
    "A `datasets` dataset as torch tensors: fixed-length token ids, label 1 where token 7 appears."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 6), generator=g)
    lengths = torch.randint(2, 7, (n,), generator=g)
    mask = (torch.arange(6) < lengths[:, None]).long()
    ids = ids * mask
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": (ids == 7).any(1).long().tolist()}).with_format("torch")


def sentence_batches(n, seed, batch_size=8):
    "What a DataLoader over `sentence_dataset` with batch_size 8 gives: dicts of tensors (the last one short)."
    return list(torch.utils.data.DataLoader(sentence_dataset(n, seed), batch_size=batch_size))


def lm_batches(n, seed, batch_size=8):
    "Counting sequences of different lengths, padded; the padding's labels are -100 (as a collator makes them)."
    g, batches = torch.Generator().manual_seed(seed), []
    for i in range(0, n, batch_size):
        k = min(batch_size, n - i)
        starts, lengths = torch.randint(0, VOCAB, (k, 1), generator=g), torch.randint(3, 11, (k,), generator=g)
        ids = (starts + torch.arange(10)) % VOCAB
        keep = torch.arange(10) < lengths[:, None]
        batches.append({"input_ids": ids, "attention_mask": keep.long(), "labels": ids.masked_fill(~keep, -100)})
    return batches


def hand_fit(model, optimizer, training, epochs, loss=None):
    "The plain loop, by hand: each training batch's own (or `loss`'s) value, as the loop computes it, in order."
    losses = []
    for _ in range(epochs):
        model.train()
        for batch in training:
            optimizer.zero_grad(set_to_none=True)
            output = model(**batch)
            value = output.loss if loss is None else loss(output.logits, batch["labels"])
            value.backward()
            optimizer.step()
            losses.append((value.item(), len(batch["labels"])))
    return losses


def weighted(pairs):
    "The loop's Loss metric: each batch's mean loss weighted by its number of samples."
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


def evaluated(model, batches):
    model.eval()
    with torch.no_grad(): return [model(**b) for b in batches]


@pytest.mark.parametrize("loss_func", [None, softmax_cross_entropy], ids=["own loss", "softmax_cross_entropy"])
def test_bert_on_a_datasets_dataloader_matches_the_hand_loop_and_sklearn(loss_func):
    training = torch.utils.data.DataLoader(sentence_dataset(100, 0), batch_size=8)  # 12 batches of 8, one of 4
    validation = sentence_batches(44, 1)
    model = tiny_bert()
    loop = TrainingLoop(training, validation, torch.optim.AdamW(model.parameters(), lr=3e-3), loss_func=loss_func,
                        metrics=["accuracy"], include_default_callbacks=False)
    torch.manual_seed(1)  # dropout draws the same numbers in both fits
    history = loop.fit(model, 2, device="cpu")

    twin = tiny_bert()
    torch.manual_seed(1)
    losses = hand_fit(twin, torch.optim.AdamW(twin.parameters(), lr=3e-3), training, 2,
                      loss=None if loss_func is None else F.cross_entropy)
    per_epoch = len(losses) // 2
    for epoch, record in enumerate(history):
        assert record["train_loss"] == pytest.approx(weighted(losses[epoch * per_epoch:(epoch + 1) * per_epoch]),
                                                     rel=1e-6)
    outputs = evaluated(twin, validation)
    assert history[-1]["valid_loss"] == pytest.approx(weighted([(o.loss.item(), len(b["labels"]))
                                                               for o, b in zip(outputs, validation)]), rel=1e-6)
    labels = torch.cat([b["labels"] for b in validation])
    assert history[-1]["valid_accuracy"] == accuracy_score(labels, torch.cat([o.logits for o in outputs]).argmax(1))


def test_the_models_own_loss_and_softmax_cross_entropy_train_alike():
    histories = []
    for loss_func in (None, softmax_cross_entropy):
        model = tiny_bert()
        loop = TrainingLoop(sentence_batches(64, 0), sentence_batches(32, 1),
                            torch.optim.AdamW(model.parameters(), lr=3e-3), loss_func=loss_func,
                            include_default_callbacks=False)
        torch.manual_seed(1)
        histories.append(loop.fit(model, 2, device="cpu"))
    for own, ours in zip(*histories):
        assert own["train_loss"] == pytest.approx(ours["train_loss"], rel=1e-5)
        assert own["valid_loss"] == pytest.approx(ours["valid_loss"], rel=1e-5)


def test_gpt2_with_padding_labels_own_loss_perplexity_and_accuracies():
    training, validation = lm_batches(60, 0), lm_batches(28, 1)  # the last batches are short (4 sequences)
    model = tiny_gpt2()
    loop = TrainingLoop(training, validation, torch.optim.AdamW(model.parameters(), lr=1e-2), loss_func=None,
                        metrics=["next_token_accuracy", "next_token_perplexity", "accuracy"],
                        include_default_callbacks=False)
    history = loop.fit(model, 2, device="cpu")
    twin = tiny_gpt2()
    losses = hand_fit(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), training, 2)
    assert history[0]["train_loss"] == pytest.approx(weighted(losses[:len(training)]), rel=1e-6)
    assert history[1]["train_loss"] == pytest.approx(weighted(losses[len(training):]), rel=1e-6)

    outputs = evaluated(twin, validation)
    own = [o.loss.item() for o in outputs]
    # valid_loss: each batch's own loss (a mean over its tokens) weighted by its number of sequences
    assert history[-1]["valid_loss"] == pytest.approx(weighted([(v, len(b["labels"])) for v, b in zip(own, validation)]),
                                                      rel=1e-6)
    # perplexity: exp of the mean over every predicted token, i.e. each batch's own loss weighted by its tokens
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in validation]
    assert history[-1]["valid_next_token_perplexity"] == pytest.approx(
        math.exp(sum(v * t for v, t in zip(own, tokens)) / sum(tokens)), rel=1e-6)
    # and that mean, from the logits: the cross-entropy over all predicted tokens at once
    logits = torch.cat([F.pad(o.logits, (0, 0, 0, 10 - o.logits.shape[1])) for o in outputs])
    labels = torch.cat([b["labels"] for b in validation])
    every_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)).item()
    assert math.log(history[-1]["valid_next_token_perplexity"]) == pytest.approx(every_token, rel=1e-5)

    def accuracy(predicted, actual):  # scikit-learn's, with the -100 positions left out
        keep = actual.reshape(-1) != -100
        return accuracy_score(actual.reshape(-1)[keep], predicted.reshape(-1)[keep])
    assert history[-1]["valid_next_token_accuracy"] == pytest.approx(
        accuracy(logits[:, :-1].argmax(-1), labels[:, 1:]), abs=1e-12)
    assert history[-1]["valid_accuracy"] == pytest.approx(accuracy(logits.argmax(-1), labels), abs=1e-12)
    assert history[-1]["valid_next_token_accuracy"] > 0.5 > history[-1]["valid_accuracy"]  # it learnt to count


def test_a_batchencoding_which_is_no_dict_is_moved_and_passed_as_keywords():
    batches = [BatchEncoding(b) for b in sentence_batches(32, 0)]
    assert not isinstance(batches[0], dict)
    model = tiny_bert()
    loop = TrainingLoop(batches, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_func=None,
                        metrics=["accuracy"], include_default_callbacks=False)
    history = loop.fit(model, 1, device="cpu")
    assert math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["valid_accuracy"] <= 1


def test_own_loss_without_labels_is_a_clear_error_naming_what_the_output_holds():
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in sentence_batches(16, 0)]
    model = tiny_bert()
    loop = TrainingLoop(unlabelled, None, torch.optim.SGD(model.parameters(), lr=0.1), loss_func=None,
                        include_default_callbacks=False)
    with pytest.raises(ValueError, match=r"SequenceClassifierOutput holding \['logits'\], without a 'loss'.*labels"):
        loop.fit(model, 1, device="cpu")


def test_a_batch_that_is_neither_a_pair_nor_a_mapping_names_both_forms():
    model = tiny_bert()
    loop = TrainingLoop([[torch.zeros(2, 3, dtype=torch.long)] * 3], None, torch.optim.SGD(model.parameters(), lr=0.1),
                        include_default_callbacks=False)
    with pytest.raises(TypeError, match=r"pair \(input, target\), or a mapping.*a list of 3 items"):
        loop.fit(model, 1, device="cpu")


def test_summary_interpret_and_lr_find_use_the_logits():
    batches = sentence_batches(48, 0)
    model = tiny_bert()
    loop = TrainingLoop(batches, batches, torch.optim.AdamW(model.parameters(), lr=3e-3),
                        metrics=["accuracy"], include_default_callbacks=False)
    summary = loop.summary(model)
    assert "logits: [8, 2]" in str(summary)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = loop.lr_find(model, num_steps=6, device="cpu")
    assert len(found.rates) == len(found.losses) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    loop.fit(model, 1, device="cpu")
    interpretation = loop.interpret()
    outputs = evaluated(model, batches)
    logits, labels = torch.cat([o.logits for o in outputs]), torch.cat([b["labels"] for b in batches])
    assert torch.equal(interpretation.predictions, logits.argmax(1)) and torch.equal(interpretation.targets, labels)
    assert torch.allclose(interpretation.losses, F.cross_entropy(logits, labels, reduction="none"), atol=1e-6)


def test_interpret_with_the_models_own_loss_says_why_there_are_no_per_sample_losses():
    batches = sentence_batches(16, 0)
    model = tiny_bert()
    loop = TrainingLoop(batches, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_func=None,
                        include_default_callbacks=False)
    interpretation = loop.interpret(model=model)
    assert interpretation.losses is None and len(interpretation.predictions) == 16


def test_the_package_loads_neither_transformers_nor_datasets():
    "They are an optional extra (`pip install trainloop_nb[hf]`): every module loads, and neither is imported."
    import subprocess
    import sys
    probe = ("import sys, trainloop_nb; trainloop_nb.__all__; import trainloop_nb.batches, trainloop_nb.evaluate; "
             "print(sorted(m for m in ('transformers', 'datasets') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
