"""Tests of trainloop_nb.data: batch iterables, Digits, and the MNIST / CIFAR-10 formats and loaders.

The writers are checked against readers that do not share their code: torchvision's own datasets,
and a hand-written idx reader and plain `pickle.load` here."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset

from trainloop_nb.data import CIFAR10, MNIST, Digits, TrainingEpochs, ValidationBatches
from trainloop_nb.data_files import write_cifar10, write_mnist

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def indexed(n):
    "A tensor dataset whose inputs and targets are the sample indices, so batches show the order."
    return torch.arange(n).float().unsqueeze(1), torch.arange(n)


def served_order(batches):
    return torch.cat([b[1] for b in batches])


class Samples(Dataset):
    "A generic map-style dataset: one sample per __getitem__."
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return torch.tensor([float(i)]), i


# ---------------------------------------------------------------- TrainingEpochs

def test_each_epoch_is_a_permutation_and_epochs_differ():
    epochs = TrainingEpochs(indexed(100), batch_size=10, seed=3, drop_last=False)
    orders = [served_order(epochs) for _ in range(4)]
    for order in orders: assert sorted(order.tolist()) == list(range(100))
    assert len({tuple(o.tolist()) for o in orders}) == 4
    assert epochs.epoch == 4


def test_drop_last_respected_and_len():
    epochs = TrainingEpochs(indexed(103), batch_size=10, seed=0)
    assert len(epochs) == 10
    batches = list(epochs)
    assert len(batches) == 10 and all(len(b[0]) == 10 for b in batches)
    order = served_order(batches)
    assert len(set(order.tolist())) == 100                         # no repeats, three samples sit out
    assert torch.equal(order, epochs.epoch_order(0)[:100])
    keep = TrainingEpochs(indexed(103), batch_size=10, drop_last=False)
    assert len(keep) == 11 and [len(b[0]) for b in keep][-1] == 3
    assert len(TrainingEpochs(indexed(100), batch_size=10)) == 10


def test_batches_pair_inputs_with_targets():
    x, y = torch.randn(50, 3, 4, 4), torch.randint(0, 10, (50,))
    epochs = TrainingEpochs((x, y), batch_size=8, seed=1)
    order = epochs.epoch_order(0)
    for i, (xb, yb) in enumerate(epochs):
        idx = order[i * 8:(i + 1) * 8]
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        assert xb.shape == (8, 3, 4, 4) and yb.dtype == torch.int64


def test_same_seed_and_epoch_reproduce_in_a_fresh_object():
    a = TrainingEpochs(indexed(64), batch_size=8, seed=7)
    runs = [served_order(a) for _ in range(3)]
    b = TrainingEpochs(indexed(64), batch_size=8, seed=7)
    b.set_epoch(2)
    assert torch.equal(served_order(b), runs[2])
    assert torch.equal(TrainingEpochs(indexed(64), 8, seed=7).epoch_order(1), runs[1])
    assert b.epoch == 3


def test_different_seeds_differ():
    orders = [TrainingEpochs(indexed(64), 8, seed=s).epoch_order(0) for s in range(4)]
    assert len({tuple(o.tolist()) for o in orders}) == 4


def test_iter_advances_epoch_before_the_first_batch():
    epochs = TrainingEpochs(indexed(20), batch_size=5)
    it = iter(epochs)
    assert epochs.epoch == 1
    assert torch.equal(next(it)[1], epochs.epoch_order(0)[:5])


def test_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for dataset in (indexed(40), Samples(40), TensorDataset(*indexed(40))):
        epochs = TrainingEpochs(dataset, batch_size=6, seed=5)
        for _ in range(2): list(epochs)
        list(ValidationBatches(dataset, batch_size=6))
        epochs.epoch_order(9)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_shuffle_serves_in_order():
    epochs = TrainingEpochs(indexed(10), batch_size=3, shuffle=False)
    assert served_order(epochs).tolist() == list(range(9))
    assert served_order(epochs).tolist() == list(range(9))


def test_generic_dataset_matches_tensor_path():
    tensor = TrainingEpochs(indexed(30), batch_size=4, seed=11)
    generic = TrainingEpochs(Samples(30), batch_size=4, seed=11)
    wrapped = TrainingEpochs(TensorDataset(*indexed(30)), batch_size=4, seed=11)
    for _ in range(2):
        for (xa, ya), (xb, yb), (xc, yc) in zip(tensor, generic, wrapped, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xc) and torch.equal(ya, yc)
    assert len(generic) == 7


def test_generic_dataset_with_workers_matches():
    plain = served_order(TrainingEpochs(Samples(24), batch_size=4, seed=2))
    workers = served_order(TrainingEpochs(Samples(24), batch_size=4, seed=2, num_workers=2))
    assert torch.equal(plain, workers)


def test_numpy_integer_batch_size_accepted():
    assert len(TrainingEpochs(indexed(10), batch_size=np.int64(5))) == 2


def test_numpy_arrays_accepted():
    x, y = np.random.rand(12, 2).astype(np.float32), np.arange(12)
    xb, yb = next(iter(TrainingEpochs((x, y), batch_size=4)))
    assert isinstance(xb, torch.Tensor) and xb.shape == (4, 2) and yb.dtype == torch.int64


def test_batches_are_copies_not_views():
    x, y = indexed(8)
    for xb, _ in ValidationBatches((x, y), batch_size=4): xb.mul_(0)
    for xb, _ in TrainingEpochs((x, y), batch_size=4): xb.mul_(0)
    assert torch.equal(x.squeeze(1), torch.arange(8).float())


def test_batches_equal_plain_indexing_for_any_shape_and_layout():
    "The batches are cut with index_select: the same values, dtype and shape as t[idx], also from non-contiguous tensors."
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 40, 5, 4, generator=g).transpose(0, 1)  # [40, 3, 5, 4], not contiguous
    labels, weights = torch.randint(0, 7, (40,), generator=g), torch.rand(40, generator=g, dtype=torch.float64)
    epochs = TrainingEpochs((images, labels, weights), batch_size=6, seed=5)
    order = epochs.epoch_order(0)
    for k, batch in enumerate(epochs):
        idx = order[6 * k:6 * k + 6]
        for cut, whole in zip(batch, (images, labels, weights), strict=True):
            assert cut.dtype == whole.dtype and torch.equal(cut, whole[idx])
    assert k == 5


def test_tensors_on_another_device_than_the_order_get_their_batches_there():
    "Tensors kept on a device (here 'meta', as a GPU would be) are cut there; tensors on the CPU beside them still pair up."
    x, y = torch.empty(10, 3, device="meta"), torch.arange(10)
    batches = list(TrainingEpochs((x, y), batch_size=4, seed=1))
    assert [(tuple(b[0].shape), b[0].device.type, b[1].device.type) for b in batches] == [((4, 3), "meta", "cpu")] * 2
    assert torch.equal(torch.cat([b[1] for b in batches]), TrainingEpochs((x, y), 4, seed=1).epoch_order(0)[:8])
    assert [tuple(b[0].shape) for b in ValidationBatches((x, y), batch_size=4)] == [(4, 3), (4, 3), (2, 3)]


@pytest.mark.parametrize("make, message", [
    (lambda: TrainingEpochs(indexed(10), batch_size=0), "batch_size must be a positive integer"),
    (lambda: TrainingEpochs(indexed(10), batch_size=2.5), "batch_size must be a positive integer"),
    (lambda: ValidationBatches(indexed(10), batch_size=-1), "batch_size must be a positive integer"),
    (lambda: TrainingEpochs((torch.zeros(10, 2), torch.zeros(9)), 2), "same length"),
    (lambda: ValidationBatches((torch.zeros(10, 2), torch.zeros(9)), 2), "same length"),
    (lambda: TrainingEpochs((torch.zeros(0, 2), torch.zeros(0)), 2), "empty"),
    (lambda: TrainingEpochs(Samples(0), 2), "empty"),
    (lambda: ValidationBatches(Samples(0), 2), "empty"),
    (lambda: TrainingEpochs(indexed(5), batch_size=8), "drop_last=False"),
    (lambda: TrainingEpochs((), 2), "tuple dataset"),
])
def test_bad_input_errors(make, message):
    with pytest.raises(ValueError, match=message): make()


def test_too_small_for_drop_last_says_what_to_do():
    with pytest.raises(ValueError) as info: TrainingEpochs(indexed(5), batch_size=8)
    text = str(info.value)
    assert "batch_size <= 5" in text and "drop_last=False" in text
    assert len(TrainingEpochs(indexed(5), batch_size=8, drop_last=False)) == 1


def test_datasets_without_length_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self): return iter(range(3))
    with pytest.raises(TypeError, match="DataLoader"): TrainingEpochs(Stream(), 2)
    with pytest.raises(TypeError, match="tensors or numpy arrays"): TrainingEpochs(([1, 2], [3, 4]), 2)


def test_set_epoch_refuses_negative():
    with pytest.raises(ValueError): TrainingEpochs(indexed(4), 2).set_epoch(-1)


# ---------------------------------------------------------------- ValidationBatches

def test_validation_keeps_order_and_last_partial_batch():
    valid = ValidationBatches(indexed(23), batch_size=5)
    assert len(valid) == 5
    for _ in range(2):                                             # re-iterable, same every time
        batches = list(valid)
        assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
        assert served_order(batches).tolist() == list(range(23))
    assert len(ValidationBatches(indexed(20), batch_size=5)) == 4
    assert len(ValidationBatches(indexed(3), batch_size=50)) == 1


def test_validation_generic_dataset():
    batches = list(ValidationBatches(Samples(7), batch_size=3))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert isinstance(batches[0], tuple)


# ---------------------------------------------------------------- Digits

@pytest.fixture(scope="module")
def digits():
    return Digits(batch_size=32)


def test_digits_shapes_dtypes_and_sizes(digits):
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.valid_x.shape[1:] == (1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    n_train, n_valid = len(digits.train_x), len(digits.valid_x)
    assert n_train + n_valid == 1797 and len(digits.train_y) == n_train and len(digits.valid_y) == n_valid
    assert abs(n_valid - 0.2 * 1797) <= 5
    assert len(digits.classes) == 10 and set(digits.train_y.tolist()) == set(range(10))
    xb, yb = next(iter(digits.training))
    assert xb.shape == (32, 1, 8, 8) and yb.shape == (32,)
    assert isinstance(digits.training, TrainingEpochs) and isinstance(digits.validation, ValidationBatches)
    assert len(digits.training) == n_train // 32 and len(digits.validation) == -(-n_valid // 32)
    assert f"{n_train} samples" in repr(digits) and f"{n_valid} samples" in repr(digits)


def test_digits_normalized_with_training_statistics(digits):
    assert abs(digits.train_x.mean().item()) < 1e-4 and abs(digits.train_x.std().item() - 1) < 1e-4
    raw = Digits(normalize=False)
    assert raw.train_x.min() == 0 and raw.train_x.max() == 1 and raw.mean is None
    assert torch.allclose((raw.train_x - digits.mean[0]) / digits.std[0], digits.train_x, atol=1e-5)
    assert torch.allclose((raw.valid_x - digits.mean[0]) / digits.std[0], digits.valid_x, atol=1e-5)


def test_digits_split_is_stratified_and_matches_sklearn(digits):
    from sklearn.datasets import load_digits
    d = load_digits()
    counts, total = torch.bincount(digits.valid_y, minlength=10), np.bincount(d.target)
    assert all(abs(c - 0.2 * t) <= 1 for c, t in zip(counts.tolist(), total))
    raw = Digits(normalize=False)
    pixels = {tuple((img / 16).astype(np.float32).ravel()): label for img, label in zip(d.images, d.target)}
    for x, y in zip(raw.valid_x[:50], raw.valid_y[:50]):
        assert pixels[tuple(x.ravel().tolist())] == y.item()   # every image keeps its own label


def test_digits_deterministic_by_seed_and_splits_disjoint(digits):
    again = Digits(batch_size=32)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.valid_y, digits.valid_y)
    other = Digits(batch_size=32, seed=1)
    assert not torch.equal(other.valid_x, digits.valid_x)
    for data in (digits, other):                                  # the 1797 images are all distinct
        train = {tuple(r.tolist()) for r in data.train_x.flatten(1)}
        valid = {tuple(r.tolist()) for r in data.valid_x.flatten(1)}
        assert not train & valid and len(train) + len(valid) == 1797


def test_digits_bad_fraction():
    with pytest.raises(ValueError, match="validation_fraction"): Digits(validation_fraction=1.0)


# ---------------------------------------------------------------- MNIST

def read_idx(path):
    "An idx reader written from the format description: big-endian magic and dims, then uint8 data."
    data = path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype == 0x08
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    assert array.size == np.prod(dims)
    return struct.unpack(">I", data[:4])[0], array.reshape(dims)


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    g = np.random.default_rng(0)
    arrays = (g.integers(0, 256, (50, 28, 28), dtype=np.uint8), g.integers(0, 10, 50),
              g.integers(0, 256, (30, 28, 28), dtype=np.uint8), g.integers(0, 10, 30))
    raw = write_mnist(root, *arrays)
    return root, raw, arrays


def test_write_mnist_files_and_headers(mnist_files):
    root, raw, (train_x, train_y, test_x, test_y) = mnist_files
    assert raw == root / "MNIST" / "raw" and sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES)
    for name, expected, magic in [("train-images-idx3-ubyte", train_x, 2051), ("train-labels-idx1-ubyte", train_y, 2049),
                                  ("t10k-images-idx3-ubyte", test_x, 2051), ("t10k-labels-idx1-ubyte", test_y, 2049)]:
        found_magic, array = read_idx(raw / name)
        assert found_magic == magic and np.array_equal(array, expected)
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:16] == bytes.fromhex("00000803" "00000032" "0000001c" "0000001c")


def test_written_mnist_reads_in_torchvision(mnist_files):
    root, _, (train_x, train_y, test_x, test_y) = mnist_files
    for train, images, labels in ((True, train_x, train_y), (False, test_x, test_y)):
        ds = torchvision.datasets.MNIST(root, train=train)
        assert len(ds) == len(images)
        for i in (0, 7, len(images) - 1):
            image, label = ds[i]
            assert np.array_equal(np.asarray(image), images[i]) and label == labels[i]


def test_mnist_wrapper(mnist_files):
    root, _, (train_x, train_y, test_x, test_y) = mnist_files
    data = MNIST(root, batch_size=16)
    assert data.train_x.shape == (50, 1, 28, 28) and data.valid_x.shape == (30, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    expected = (torch.tensor(train_x, dtype=torch.float32) / 255 - 0.1307) / 0.3081
    assert torch.allclose(data.train_x[:, 0], expected, atol=1e-5)
    assert data.train_y.tolist() == train_y.tolist() and data.valid_y.tolist() == test_y.tolist()
    assert isinstance(data.training, TrainingEpochs) and isinstance(data.validation, ValidationBatches)
    assert len(data.training) == 3 and len(data.validation) == 2 and len(data.classes) == 10
    raw = MNIST(root, batch_size=16, normalize=False, limit=20)
    assert raw.train_x.shape == (20, 1, 28, 28) and raw.valid_x.shape == (20, 1, 28, 28)
    assert torch.equal(raw.train_x[:, 0], torch.tensor(train_x[:20], dtype=torch.float32) / 255)
    assert "50 samples" in repr(data) and "30 samples" in repr(data)


def test_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as info: MNIST(tmp_path / "nothing")
    text = str(info.value)
    assert str(tmp_path / "nothing" / "MNIST" / "raw") in text and "download=True" in text
    assert all(name in text for name in MNIST_FILES)


def test_mnist_one_file_missing(tmp_path):
    g = np.random.default_rng(1)
    raw = write_mnist(tmp_path, g.integers(0, 256, (4, 28, 28)), [1, 2, 3, 4], g.integers(0, 256, (2, 28, 28)), [5, 6])
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte\\."): MNIST(tmp_path, batch_size=2)


def test_write_mnist_refuses_bad_arrays(tmp_path):
    ok = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="0 to 255"): write_mnist(tmp_path, ok + 256.0, [0, 1], ok, [0, 1])
    with pytest.raises(ValueError, match="0 to 255"): write_mnist(tmp_path, ok + 0.5, [0, 1], ok, [0, 1])
    with pytest.raises(ValueError, match="one number per image"): write_mnist(tmp_path, ok, [0], ok, [0, 1])
    with pytest.raises(ValueError, match="rows, cols"): write_mnist(tmp_path, ok[:, None], [0, 1], ok, [0, 1])
    assert not (tmp_path / "MNIST").exists()                       # nothing written when refused
    write_mnist(tmp_path, torch.zeros(2, 28, 28, dtype=torch.int64), torch.tensor([3, 4]), ok, [0, 1])
    assert read_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte")[1].tolist() == [3, 4]


# ---------------------------------------------------------------- CIFAR-10

@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    g = np.random.default_rng(0)
    arrays = (g.integers(0, 256, (23, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, 23),
              g.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, 9))
    folder = write_cifar10(root, *arrays)
    return root, folder, arrays


def test_write_cifar10_pickles(cifar_files):
    root, folder, (train_x, train_y, test_x, test_y) = cifar_files
    assert folder == root / "cifar-10-batches-py" and sorted(p.name for p in folder.iterdir()) == sorted(CIFAR_FILES)
    rows, labels = [], []
    for name in CIFAR_FILES[:5]:
        with open(folder / name, "rb") as f: entry = pickle.load(f, encoding="bytes")   # the CIFAR page's recipe
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape[1] == 3072
        assert isinstance(entry[b"labels"], list)
        rows.append(entry[b"data"]); labels += entry[b"labels"]
    data = np.vstack(rows)
    assert labels == train_y.tolist()
    # row layout: 1024 red values, then green, then blue, each image row-major
    assert np.array_equal(data[:, :1024].reshape(-1, 32, 32), train_x[:, 0])
    assert np.array_equal(data[:, 2048:].reshape(-1, 32, 32), train_x[:, 2])
    with open(folder / "test_batch", "rb") as f: entry = pickle.load(f, encoding="latin1")  # torchvision's way
    assert np.array_equal(entry["data"], test_x.reshape(9, 3072)) and entry["labels"] == test_y.tolist()
    with open(folder / "batches.meta", "rb") as f: meta = pickle.load(f, encoding="latin1")
    assert meta["label_names"][:2] == ["airplane", "automobile"] and len(meta["label_names"]) == 10


def test_written_cifar10_reads_in_torchvision(cifar_files, monkeypatch):
    root, _, (train_x, train_y, test_x, test_y) = cifar_files
    # written files cannot match the official md5s: let torchvision's own check accept existing files
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    for train, images, labels in ((True, train_x, train_y), (False, test_x, test_y)):
        ds = torchvision.datasets.CIFAR10(root, train=train)
        assert len(ds) == len(images) and ds.classes[9] == "truck"
        for i in (0, 5, len(images) - 1):
            image, label = ds[i]
            assert np.array_equal(np.asarray(image), images[i].transpose(1, 2, 0)) and label == labels[i]


def test_cifar10_wrapper(cifar_files):
    root, _, (train_x, train_y, test_x, test_y) = cifar_files
    data = CIFAR10(root, batch_size=4, check_integrity=False)
    assert data.train_x.shape == (23, 3, 32, 32) and data.valid_x.shape == (9, 3, 32, 32)
    assert data.train_x.is_contiguous() and data.train_x.dtype == torch.float32 and data.valid_y.dtype == torch.int64
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1), torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = (torch.tensor(train_x, dtype=torch.float32) / 255 - mean) / std
    assert torch.allclose(data.train_x, expected, atol=1e-5)
    assert data.train_y.tolist() == train_y.tolist() and data.valid_y.tolist() == test_y.tolist()
    assert len(data.training) == 5 and len(data.validation) == 3 and data.classes[3] == "cat"
    small = CIFAR10(root, batch_size=4, check_integrity=False, limit=8, normalize=False)
    assert len(small.train_x) == 8 and len(small.valid_x) == 8
    assert torch.equal(small.valid_x, torch.tensor(test_x[:8], dtype=torch.float32) / 255)


def test_cifar10_channels_last_input_is_the_same_file(tmp_path, cifar_files):
    _, folder, (train_x, train_y, test_x, test_y) = cifar_files
    other = write_cifar10(tmp_path, train_x.transpose(0, 2, 3, 1), train_y, test_x.transpose(0, 2, 3, 1), test_y)
    for name in CIFAR_FILES: assert (other / name).read_bytes() == (folder / name).read_bytes()


def test_cifar10_checksum_mismatch_is_explained(cifar_files):
    root, folder, _ = cifar_files
    with pytest.raises(RuntimeError) as info: CIFAR10(root)
    text = str(info.value)
    assert str(folder) in text and "check_integrity=False" in text and "data_batch_1" in text
    assert not isinstance(info.value, FileNotFoundError)


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as info: CIFAR10(tmp_path, check_integrity=False)
    text = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in text and "download=True" in text and "data_batch_1" in text
    with pytest.raises(FileNotFoundError): CIFAR10(tmp_path)


def test_cifar10_missing_meta(tmp_path, cifar_files):
    _, _, arrays = cifar_files
    folder = write_cifar10(tmp_path, *arrays)
    (folder / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match="missing batches.meta"): CIFAR10(tmp_path, check_integrity=False)


def test_write_cifar10_refuses_bad_arrays(tmp_path):
    ok = np.zeros((2, 3, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="channels first"): write_cifar10(tmp_path, ok[:, :, :28], [0, 1], ok, [0, 1])
    with pytest.raises(ValueError, match="0 to 9"): write_cifar10(tmp_path, ok, [0, 10], ok, [0, 1])
    with pytest.raises(ValueError, match="0 to 255"): write_cifar10(tmp_path, ok - 1.0, [0, 1], ok, [0, 1])
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_limit_validated(mnist_files):
    with pytest.raises(ValueError, match="limit"): MNIST(mnist_files[0], limit=0)
