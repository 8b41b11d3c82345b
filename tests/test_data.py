"""Data: the real files load with their known statistics; downloads go through a local HTTP server
into a cache and are checked; binarization and batching are deterministic and resumable; bad
data is refused with a message that says what is wrong and where."""

import contextlib
import gzip
import hashlib
import http.server
import itertools
import os
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

from elbojax import data

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir(),
    reason=f"the benchmark data folder {SHARED_DATA} is absent (CI has it)",
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_T10K_LABELS_SHA256 = "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist(SHARED_DATA)


@pytest.fixture(scope="module")
def binarized_mnist():
    return data.load_binarized_mnist(SHARED_DATA)


@contextlib.contextmanager
def serve(directory):
    """An HTTP server on 127.0.0.1 for `directory`; yields its URL and the (path, status) it answered."""
    answered = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_request(self, code="-", size="-"):
            answered.append((self.path, int(code)))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", answered
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 10.0)


def assert_same_dataset(a, b):
    for split_a, split_b in zip(a, b):
        np.testing.assert_array_equal(split_a.images, split_b.images)
        if split_a.labels is None or split_b.labels is None:
            assert split_a.labels is None and split_b.labels is None
        else:
            np.testing.assert_array_equal(split_a.labels, split_b.labels)


# ----------------------------------------------------------------------------------------------
# The real files


@needs_shared_data
def test_mnist_matches_its_known_statistics(mnist):
    assert mnist.train.images.shape == (60000, 28, 28) and mnist.test.images.shape == (10000, 28, 28)
    assert mnist.train.images.dtype == mnist.test.images.dtype == np.uint8
    assert mnist.train.labels.shape == (60000,) and mnist.valid.images.shape == (0, 28, 28)
    assert mnist.train.images.min() == 0 and mnist.train.images.max() == 255
    np.testing.assert_array_equal(np.bincount(mnist.train.labels), MNIST_TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(mnist.test.labels), MNIST_TEST_COUNTS)
    assert round(mnist.train.images.mean() / 255, 4) == 0.1307
    assert round(mnist.test.images.mean() / 255, 4) == 0.1325


@needs_shared_data
def test_fashion_mnist_with_a_validation_split_of_the_last_training_images():
    fashion = data.load_fashion_mnist(SHARED_DATA, num_valid=400)
    assert [len(split.images) for split in fashion] == [59600, 400, 10000]
    labels = data.read_idx(SHARED_DATA / "fashion-mnist" / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(fashion.valid.labels, labels[-400:])
    all_train_labels = np.concatenate([fashion.train.labels, fashion.valid.labels])
    np.testing.assert_array_equal(np.bincount(all_train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fashion.test.labels), [1000] * 10)
    assert round(fashion.test.images.mean() / 255, 4) == 0.2868


@needs_shared_data
def test_binarized_mnist_is_binary_with_the_documented_fractions_of_ones(binarized_mnist):
    train, valid, test = binarized_mnist
    assert [len(split.images) for split in binarized_mnist] == [50000, 10000, 10000]
    assert train.images.shape[1:] == valid.images.shape[1:] == test.images.shape[1:] == (28, 28)
    assert all(split.images.dtype == bool and split.labels is None for split in binarized_mnist)
    assert [round(split.images.mean(), 6) for split in binarized_mnist] == [0.130562, 0.131127, 0.132512]


@needs_shared_data
def test_binarized_test_images_are_a_sample_of_the_mnist_test_digits_by_class(mnist, binarized_mnist):
    # Checks the pixel layout: a 1 only where the grey level is > 0, a 0 only where it is < 255.
    grey = mnist.test.images[np.argsort(mnist.test.labels, kind="stable")]
    binary = binarized_mnist.test.images
    assert not (binary & (grey == 0)).any() and not (~binary & (grey == 255)).any()
    shifted = np.roll(binary, 1, axis=2)  # the same test must catch a wrong layout
    assert (shifted & (grey == 0)).any()


@needs_shared_data
def test_merge_train_valid_trains_on_all_60000():
    merged = data.load_binarized_mnist(SHARED_DATA, merge_train_valid=True)
    assert [len(split.images) for split in merged] == [60000, 0, 10000]


def test_embedded_mnist_loads_without_files():
    embedded = data.load_embedded_mnist()
    assert [split.images.shape for split in embedded] == [(10000, 28, 28), (0, 28, 28), (2000, 28, 28)]
    assert all(split.images.dtype == np.uint8 and split.labels.dtype == np.uint8 for split in embedded)
    assert embedded.train.labels.max() == 9 and np.bincount(embedded.train.labels).min() > 800


@needs_shared_data
def test_embedded_mnist_is_the_first_images_of_the_official_files(mnist):
    embedded = data.load_embedded_mnist()
    for small, full in [(embedded.train, mnist.train), (embedded.test, mnist.test)]:
        np.testing.assert_array_equal(small.images, full.images[: len(small.images)])
        np.testing.assert_array_equal(small.labels, full.labels[: len(small.labels)])


def test_the_embedded_file_is_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["elbojax"]
    package = Path(data.__file__).parent
    assert any((package / "_data" / data._EMBEDDED_MNIST) in package.glob(pattern) for pattern in patterns)


# ----------------------------------------------------------------------------------------------
# Download and cache


@needs_shared_data
@pytest.mark.timeout(120)
def test_download_into_the_cache_then_load_without_the_server(tmp_path, monkeypatch, short_timeout, mnist):
    with serve(SHARED_DATA) as (url, answered):
        downloaded = data.load_mnist(tmp_path, download=True, base_url=url + "mnist/")
    assert sorted(answered) == sorted((f"/mnist/{file.name}", 200) for file in data._MNIST_FILES)
    assert_same_dataset(downloaded, mnist)
    for file in data._MNIST_FILES:
        stored = (tmp_path / "mnist" / file.name).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == file.sha256
    stored_names = sorted(path.name for path in (tmp_path / "mnist").iterdir())
    assert stored_names == sorted(file.name for file in data._MNIST_FILES)  # no partial files left
    umask = os.umask(0o022)
    os.umask(umask)
    for file in data._MNIST_FILES:  # the mode a plain write gives, so a shared cache is readable
        assert (tmp_path / "mnist" / file.name).stat().st_mode & 0o777 == 0o666 & ~umask

    # The server is gone: the cache is used (here found through the environment variable).
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.default_data_dir() == tmp_path
    assert_same_dataset(data.load_mnist(download=True, base_url=url + "mnist/"), mnist)


@needs_shared_data
@pytest.mark.timeout(120)
def test_download_falls_back_to_a_gzipped_copy(tmp_path, short_timeout, binarized_mnist):
    with serve(SHARED_DATA) as (url, answered):
        base_url = url + "binarized_mnist/"
        downloaded = data.load_binarized_mnist(tmp_path, download=True, base_url=base_url)
    name = "/binarized_mnist/binarized_mnist_test.amat"
    assert (name, 404) in answered and (name + ".gz", 200) in answered
    assert (tmp_path / "binarized_mnist" / "binarized_mnist_test.amat.gz").is_file()
    assert_same_dataset(downloaded, binarized_mnist)


@needs_shared_data
@pytest.mark.timeout(60)
def test_a_corrupt_download_is_refused_and_not_stored(tmp_path, short_timeout):
    served = tmp_path / "served" / "mnist"
    served.mkdir(parents=True)
    for file in data._MNIST_FILES:
        (served / file.name).write_bytes((SHARED_DATA / "mnist" / file.name).read_bytes())
    truncated = (served / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-10]
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(truncated)
    cache = tmp_path / "cache"
    with serve(tmp_path / "served") as (url, _), pytest.raises(ValueError) as error:
        data.load_mnist(cache, download=True, base_url=url + "mnist/")
    message = str(error.value)
    assert f"{url}mnist/t10k-labels-idx1-ubyte.gz" in message
    assert f"expected {MNIST_T10K_LABELS_SHA256}" in message
    assert f"its sha256 is {hashlib.sha256(truncated).hexdigest()}" in message
    assert "Nothing was stored" in message and "Delete it" not in message
    assert not (cache / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((cache / "mnist").glob(".*part"))


@pytest.mark.timeout(60)
def test_a_file_missing_on_the_server_is_a_clear_error(tmp_path, short_timeout):
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as (url, _), pytest.raises(FileNotFoundError, match="HTTP 404"):
        data.load_binarized_mnist(tmp_path / "cache", download=True, base_url=url)


@pytest.mark.timeout(60)
def test_an_unreachable_server_is_a_clear_error(tmp_path, short_timeout):
    with serve(tmp_path) as (url, _):
        pass  # closed: the port now refuses connections
    with pytest.raises(OSError, match=r"Downloading http://127\.0\.0\.1:\d+/train-images-idx3-ubyte\.gz fail"):
        data.load_mnist(tmp_path, download=True, base_url=url)


@needs_shared_data
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_cached_file_is_refused_with_both_checksums(tmp_path, damage):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for file in data._MNIST_FILES:
        (folder / file.name).write_bytes((SHARED_DATA / "mnist" / file.name).read_bytes())
    path = folder / "t10k-labels-idx1-ubyte.gz"
    bad = b"not MNIST at all" if damage == "garbage" else path.read_bytes()[:1000]
    path.write_bytes(bad)
    with pytest.raises(ValueError) as error:
        data.load_mnist(tmp_path, download=True, base_url="http://127.0.0.1:9/never-contacted/")
    message = str(error.value)
    assert str(path) in message and "corrupt" in message
    assert f"its sha256 is {hashlib.sha256(bad).hexdigest()}, expected {MNIST_T10K_LABELS_SHA256}" in message


def test_a_corrupt_gzipped_copy_is_refused(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    for file in data._BINARIZED_MNIST_FILES:
        (folder / (file.name + ".gz")).write_bytes(gzip.compress(b"0 1\n"))
    (folder / "binarized_mnist_train.amat.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match=r"binarized_mnist_train\.amat\.gz is corrupt: .* does not decompress"):
        data.load_binarized_mnist(tmp_path)
    (folder / "binarized_mnist_train.amat.gz").write_bytes(gzip.compress(b"0 1\n"))
    with pytest.raises(ValueError, match=r"\(once decompressed\) is corrupt .* its sha256 is [0-9a-f]{64}, expected ad693b29"):
        data.load_binarized_mnist(tmp_path)


def test_a_missing_file_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load_mnist(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "download=True" in message and data.MNIST_URL + "train-images-idx3-ubyte.gz" in message
    looked = r"looked for \S*binarized_mnist_train\.amat or \S*binarized_mnist_train\.amat\.gz\."
    with pytest.raises(FileNotFoundError, match=looked):
        data.load_binarized_mnist(tmp_path)


def test_the_default_data_folder(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.default_data_dir() == Path.home() / ".cache" / "elbojax"


def test_without_a_home_folder_the_default_data_folder_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(Path, "expanduser", lambda self: (_ for _ in ()).throw(RuntimeError("no home")))
    with pytest.raises(FileNotFoundError, match=r"pass `data_dir`, or set \$ELBOJAX_DATA_DIR"):
        data.load_mnist()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"download": "no"}, TypeError, r"`download` must be True or False, got 'no' of type str"),
        ({"download": 1}, TypeError, r"`download` must be True or False, got 1 of type int"),
        ({"base_url": "http://127.0.0.1:9/mnist"}, ValueError, r"`base_url` must be a URL ending in '/'"),
    ],
)
def test_bad_download_arguments_are_refused_before_reading(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        data.load_mnist(tmp_path, **kwargs)


def test_merge_train_valid_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match=r"`merge_train_valid` must be True or False, got 'False'"):
        data.load_binarized_mnist(tmp_path, merge_train_valid="False")


def test_bad_num_valid_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"`num_valid` must be an int >= 0, got -1"):
        data.load_mnist(tmp_path, num_valid=-1)
    with pytest.raises(TypeError, match=r"`num_valid` must be an int >= 0, got 0.5 of type float"):
        data.load_mnist(tmp_path, num_valid=0.5)


# ----------------------------------------------------------------------------------------------
# File formats


def idx_bytes(array, type_code):
    shape = np.array(array.shape, ">u4").tobytes()
    return bytes([0, 0, type_code, array.ndim]) + shape + array.tobytes()


def test_read_idx_reads_the_header_shape_and_big_endian_values(tmp_path):
    values = np.arange(-6, 6, dtype=">i2").reshape(2, 3, 2)
    (tmp_path / "a.idx").write_bytes(idx_bytes(values, 0x0B))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(values, 0x0B)))
    for name in ["a.idx", "a.idx.gz"]:
        read = data.read_idx(tmp_path / name)
        assert read.shape == (2, 3, 2) and read.dtype == np.int16 and read.dtype.isnative
        np.testing.assert_array_equal(read, values)


def test_read_idx_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.idx").write_bytes(idx_bytes(np.arange(3, dtype=np.uint8), 0x08))
    np.testing.assert_array_equal(data.read_idx("~/a.idx"), [0, 1, 2])


def test_read_idx_states_the_true_size_of_a_huge_header(tmp_path):
    # 65536**4 bytes wraps to 0 in int64; Python ints state it exactly.
    (tmp_path / "huge.idx").write_bytes(b"\x00\x00\x08\x04" + np.full(4, 65536, ">u4").tobytes())
    with pytest.raises(ValueError, match=rf"which takes {20 + 65536**4} bytes, but the file has 20"):
        data.read_idx(tmp_path / "huge.idx")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x01\x08\x01" + b"\x00" * 8, r"not an IDX file: its magic number is 00010801"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, r"not an IDX file: its magic number is 00000701"),
        (b"", r"magic number is missing"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"the IDX header is cut short \(8 bytes, expected 16\)"),
        (
            idx_bytes(np.zeros((2, 2, 2), np.uint8), 0x08)[:-1],
            r"states shape \(2, 2, 2\) of uint8, which takes 24 bytes, but the file has 23",
        ),
        (
            idx_bytes(np.zeros((2, 2), np.uint8), 0x08) + b"\x00",
            r"states shape \(2, 2\) of uint8, which takes 16 bytes, but the file has 17",
        ),
    ],
)
def test_read_idx_refuses_a_wrong_magic_or_shape(tmp_path, content, match):
    (tmp_path / "bad.idx").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        data.read_idx(tmp_path / "bad.idx")


def test_amat_parser_accepts_the_format_and_refuses_anything_else():
    row = " ".join(["1"] * 3 + ["0"] * 781) + "\n"
    parsed = data._parse_binarized_amat(row.encode() * 2, "x")
    assert parsed.shape == (2, 28, 28) and parsed.dtype == bool and parsed.sum() == 6
    for bad in [row.replace("1", "2", 1), row.replace(" ", ",", 1), row[:-1] + " ", row[:-2]]:
        with pytest.raises(ValueError, match="x is not binarized MNIST in .amat format"):
            data._parse_binarized_amat(bad.encode(), "x")


# ----------------------------------------------------------------------------------------------
# Binarization


@pytest.fixture(scope="module")
def grey():
    return data.load_embedded_mnist().train.images


def test_dynamic_binarization_is_fixed_by_seed_epoch_and_step(grey):
    batch = grey[:64]
    draw = data.dynamic_binarize(batch, seed=3, epoch=1, step=7)
    assert draw.dtype == np.float32 and draw.shape == batch.shape
    np.testing.assert_array_equal(draw, data.dynamic_binarize(batch, seed=3, epoch=1, step=7))
    for other in [dict(seed=4, epoch=1, step=7), dict(seed=3, epoch=2, step=7), dict(seed=3, epoch=1, step=8)]:
        assert (data.dynamic_binarize(batch, **other) != draw).mean() > 0.01, other
    # A slice of the batch draws what the whole batch draws for those rows.
    part = data.dynamic_binarize(batch[16:40], seed=3, epoch=1, step=7, rows=slice(16, 40), batch_size=64)
    np.testing.assert_array_equal(part, draw[16:40])
    with pytest.raises(TypeError, match=r"`batch_size` \(the whole batch's size\) is required with `rows`"):  # was ">= 0, got None"
        data.dynamic_binarize(batch[:2], seed=3, epoch=1, step=7, rows=slice(0, 2))
    with pytest.raises(TypeError, match=r"`rows` must be a slice of the batch"):  # was "range indices must be integers"
        data.dynamic_binarize(batch[:2], seed=3, epoch=1, step=7, rows=[0, 1], batch_size=64)
    with pytest.raises(TypeError, match=r"`batch_size` is only used with `rows`"):  # was ignored
        data.dynamic_binarize(batch[32:], seed=3, epoch=1, step=7, batch_size=64)


@pytest.mark.parametrize(
    "binarize",
    [
        lambda images: data.dynamic_binarize(images, seed=0, epoch=5, step=11, dtype=bool),
        lambda images: data.static_binarize(images, seed=0, dtype=bool),
    ],
    ids=["dynamic", "static"],
)
def test_bernoulli_binarization_has_mean_grey_over_255(grey, binarize):
    draw = binarize(grey)
    assert draw.dtype == bool
    assert not draw[grey == 0].any() and draw[grey == 255].all()
    p = grey / 255.0
    for low, high in [(1, 64), (64, 128), (128, 192), (192, 255)]:
        inside = (grey >= low) & (grey < high)
        z = (draw[inside].sum() - p[inside].sum()) / np.sqrt((p * (1 - p))[inside].sum())
        assert abs(z) < 4, (low, high, z)


def test_static_binarization_is_one_fixed_sample(grey):
    batch = grey[:64]
    fixed = data.static_binarize(batch, seed=1)
    np.testing.assert_array_equal(fixed, data.static_binarize(batch, seed=1))
    assert (data.static_binarize(batch, seed=2) != fixed).mean() > 0.01
    assert (data.dynamic_binarize(batch, seed=1, epoch=0, step=0) != fixed).mean() > 0.01


def test_threshold_binarization():
    images = np.array([0, 127, 128, 255], np.uint8)
    np.testing.assert_array_equal(data.threshold_binarize(images), [0, 0, 1, 1])
    np.testing.assert_array_equal(data.threshold_binarize(images, threshold=0.0), [0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"`threshold` must be a number in \[0, 1\], got 127"):
        data.threshold_binarize(images, threshold=127)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros(3, np.float32), r"`images` must be uint8 grey levels 0..255, got dtype float32\. Probabilities"),
        (np.zeros(3, bool), r"`images` must be uint8 grey levels 0..255, got dtype bool\. These are binary already"),
    ],
)
def test_binarization_refuses_images_that_are_not_grey_levels(images, match):
    for binarize in [
        lambda x: data.dynamic_binarize(x, seed=0, epoch=0, step=0),
        lambda x: data.static_binarize(x, seed=0),
        data.threshold_binarize,
    ]:
        with pytest.raises(TypeError, match=match):
            binarize(images)


# ----------------------------------------------------------------------------------------------
# Batching


def test_batch_indices_partition_a_permutation():
    batches = data.batch_indices(seed=0, epoch=0, num_examples=103, batch_size=10)
    assert batches.shape == (10, 10) and batches.dtype == np.int64
    assert len(np.unique(batches)) == 100 and batches.min() >= 0 and batches.max() < 103
    np.testing.assert_array_equal(batches, data.batch_indices(0, 0, 103, 10))
    assert not np.array_equal(batches, data.batch_indices(0, 1, 103, 10))
    assert not np.array_equal(batches, data.batch_indices(1, 0, 103, 10))


def test_batches_resume_exactly_from_any_position():
    stream = list(itertools.islice(data.iterate_batches(7, 103, 10), 35))
    assert [(b.epoch, b.step) for b in stream[:12]] == [(0, s) for s in range(10)] + [(1, 0), (1, 1)]
    for k, batch in enumerate(stream[:-1]):
        resumed = data.iterate_batches(7, 103, 10, start_epoch=batch.epoch, start_step=batch.step + 1)
        for expected, got in zip(stream[k + 1 :], resumed):
            assert (got.epoch, got.step) == (expected.epoch, expected.step)
            np.testing.assert_array_equal(got.indices, expected.indices)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(start_step=11), ValueError, r"`start_step` must be at most the 10 batches per epoch, got 11"),
        (dict(start_epoch=-1), ValueError, r"`start_epoch` must be an int >= 0, got -1"),
        (dict(batch_size=104), ValueError, r"`batch_size` \(104\) must not exceed `num_examples` \(103\)"),
        (dict(batch_size=0), ValueError, r"`batch_size` must be an int >= 1, got 0"),
        (dict(batch_size=None), TypeError, r"`batch_size` must be an int >= 1, got None of type NoneType"),
        (dict(seed=-1), ValueError, r"`seed` must be an int >= 0, got -1"),
        (dict(seed=True), TypeError, r"`seed` must be an int >= 0, got True of type bool"),
        # Two 32-bit words would share a stream: seed 2**32 + 7 shuffled as epoch 1 of seed 7.
        (dict(seed=2**32 + 7), ValueError, r"`seed` must be an int in \[0, 2\*\*32\), got 4294967303"),
    ],
)
def test_bad_batching_arguments_are_refused_at_the_call(kwargs, error, match):
    arguments = dict(seed=0, num_examples=103, batch_size=10) | kwargs
    with pytest.raises(error, match=match):
        data.iterate_batches(**arguments)  # raises here, not at the first `next`


# ----------------------------------------------------------------------------------------------
# Checks for the training loop


def test_checks_accept_good_batches():
    import ml_dtypes

    bfloat16 = np.array([0.0, 1.0], ml_dtypes.bfloat16)  # NumPy's kind "V": it was "not a numeric array"
    for x in [np.array([0.0, 1.0], np.float32), np.array([True, False]), np.array([[0, 1]], np.uint8), bfloat16]:
        data.check_binary(x, "x")
        data.check_unit_interval(x, "x")
        data.check_finite(x, "x")
    data.check_unit_interval(np.array([0.0, 0.25, 1.0]), "x")
    with pytest.raises(ValueError, match=r"`x` must not contain NaN"):
        data.check_binary(np.array([1.0, np.nan], ml_dtypes.bfloat16), "x")
    with pytest.raises(ValueError, match=r"`x` must be finite"):
        data.check_finite(np.array([1.0, np.inf], ml_dtypes.bfloat16), "x")


@pytest.mark.parametrize(
    "check, x, error, match",
    [
        (
            data.check_binary, [[0.0, 1.0], [1.0, np.nan]], ValueError,
            r"`x` must not contain NaN; got nan at index \(1, 1\) \(1 of 4 values",
        ),
        (
            data.check_binary, [[0.0, 1.0], [0.5, 0.5]], ValueError,
            r"`x` must be binary \(every value 0 or 1\); got 0\.5 at index \(1, 0\) \(2 of 4 values",
        ),
        (
            data.check_binary, np.array([0, 2], np.int32), ValueError,
            r"must be binary .*got 2 at index \(1,\)",
        ),
        (data.check_unit_interval, [0.5, np.nan], ValueError, r"`x` must not contain NaN"),
        (
            data.check_unit_interval, [0.5, 1.5, -0.1], ValueError,
            r"`x` must lie in \[0, 1\]; got 1\.5 at index \(1,\) \(2 of 3 values",
        ),
        (
            data.check_unit_interval, np.array([0, 255], np.uint8), ValueError,
            r"must lie in \[0, 1\]; got 255 at index \(1,\) .*\)\. Grey levels 0..255 must be divided",
        ),
        (
            data.check_binary, np.array(["0", "1"]), TypeError,
            r"`x` must be a numeric array, got dtype <U1",
        ),
        (
            data.check_unit_interval, np.array([1j]), TypeError,
            r"`x` must be a numeric array, got dtype complex128",
        ),
    ],
)
def test_checks_refuse_bad_batches(check, x, error, match):
    with pytest.raises(error, match=match):
        check(np.asarray(x), "x")
