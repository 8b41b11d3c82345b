r"""Data for VAEs: MNIST, Fashion-MNIST and binarized MNIST; binarization; resumable batching.

Everything here is numpy on the host; nothing is traced. The checks at the end
(`check_binary`, `check_unit_interval`) are for the training loop to call on a batch before it
goes to the device, where its values can no longer be inspected.

**Data sets.** Each loader returns a `Dataset` of `Split`s (`train`, `valid`, `test`) whose images
have shape `(n, 28, 28)` and are never rescaled: grey levels are `uint8` in 0..255, the
fixed binarization is `bool`.

* `load_embedded_mnist()`: a subset of MNIST shipped inside the package, so examples, tests and
  smoke runs need neither network nor data folder: the first 10,000 images of the official
  training file and the first 2,000 of the test file, with their labels, pixels unmodified
  (`_data/make_embedded_mnist.py` makes it). The first half of the MNIST test file is known to be
  cleaner than the second, so numbers on this test subset are not comparable with the full one.
* `load_mnist`: MNIST (LeCun, Cortes & Burges, http://yann.lecun.com/exdb/mnist/), 60,000
  training and 10,000 test images of handwritten digits. The MNIST page states no licence; the
  licence commonly given for it is Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0),
  which then also applies to the embedded subset (unmodified MNIST data) and to the binarized
  MNIST below (derived from it).
* `load_fashion_mnist`: Fashion-MNIST (Xiao, Rasul & Vollgraf, https://arxiv.org/abs/1708.07747),
  same format, ten classes of clothing; MIT licence.
* `load_binarized_mnist`: the fixed binarization of MNIST by Larochelle & Murray (2011,
  http://proceedings.mlr.press/v15/larochelle11a.html), 50,000 / 10,000 / 10,000 images, each
  pixel one Bernoulli(grey/255) draw, made once; no labels.

**Splits of the IWAE paper** (Burda, Grosse & Salakhutdinov, https://arxiv.org/abs/1509.00519).
MNIST: the official 60,000 / 10,000 (the default; its code held out the last 400 training
images for validation, `num_valid=400`), binarized on the fly (`dynamic_binarize`). Binarized
MNIST: its code concatenates train and valid and then takes the last 10,000 off again as
validation, so it trains on the 50,000 training images: the default here. `merge_train_valid=True`
trains on all 60,000.

**Files and the cache.** The loaders read `<data_dir>/mnist/`, `<data_dir>/fashion-mnist/` and
`<data_dir>/binarized_mnist/`. `data_dir` is the argument, else `$ELBOJAX_DATA_DIR`, else
`~/.cache/elbojax`. With `download=True` a missing file is fetched once from `base_url` (written
to a temporary file, checked, then renamed into place, so no data file's name ever holds a
partial file; a download killed midway can leave a hidden `.<name>.*.part` behind, which is never
read). Every file is checked against its SHA-256 before it is parsed. The IDX files are checked
as distributed (`.gz`); the binarized `.amat` files are distributed uncompressed, may also be
kept gzipped as `<name>.amat.gz`, and are then checked after decompression. The checksums are
what makes the plain-http default URLs safe to use.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.resources
import io
import math
import numbers
import os
import secrets
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "BINARIZED_MNIST_URL",
    "Batch",
    "Dataset",
    "FASHION_MNIST_URL",
    "MNIST_URL",
    "Split",
    "batch_indices",
    "check_binary",
    "check_seed",
    "check_unit_interval",
    "default_data_dir",
    "dynamic_binarize",
    "is_float",
    "iterate_batches",
    "load_binarized_mnist",
    "load_embedded_mnist",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "static_binarize",
    "threshold_binarize",
]

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

DATA_DIR_ENV = "ELBOJAX_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 60.0

_EMBEDDED_MNIST = "mnist_subset.npz"
_EMBEDDED_MNIST_SHA256 = "f45a958c04102ebd016b4861764227d102f63744658d3d13f4d84e40e5eb13b8"

# First entropy word of each random stream, so that no two streams share a seed sequence.
_SHUFFLE_STREAM, _DYNAMIC_STREAM, _STATIC_STREAM = 0, 1, 2


class Split(NamedTuple):
    """The images and labels of one split.

    Attributes:
      images: `uint8[n, 28, 28]` grey levels 0..255, or `bool[n, 28, 28]` for data that is
        binary as distributed.
      labels: `uint8[n]` classes 0..9, or `None` where the files carry no labels.
    """

    images: np.ndarray
    labels: np.ndarray | None


class Dataset(NamedTuple):
    """A data set as training, validation and test splits (`valid` may hold 0 images)."""

    train: Split
    valid: Split
    test: Split


class _File(NamedTuple):
    name: str  # as distributed, and as stored in the data folder
    sha256: str  # of the file as distributed


_MNIST_FILES = (
    _File("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    _File("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    _File("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    _File("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)
_FASHION_MNIST_FILES = (
    _File("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    _File("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    _File("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    _File("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
)
# The checksums TensorFlow Datasets records for the files at BINARIZED_MNIST_URL.
_BINARIZED_MNIST_FILES = (
    _File("binarized_mnist_train.amat", "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
    _File("binarized_mnist_valid.amat", "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
    _File("binarized_mnist_test.amat", "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
)


# ----------------------------------------------------------------------------------------------
# Loaders


def default_data_dir() -> Path:
    """The data folder used when none is given: `$ELBOJAX_DATA_DIR`, else `~/.cache/elbojax`."""
    try:
        return Path(os.environ.get(DATA_DIR_ENV) or "~/.cache/elbojax").expanduser()
    except RuntimeError as error:  # no $HOME and no passwd entry: "~" has no meaning
        raise FileNotFoundError(
            f"No data folder: pass `data_dir`, or set ${DATA_DIR_ENV}; the default "
            f"~/.cache/elbojax needs a home folder, and this process has none ({error})."
        ) from error


def load_embedded_mnist() -> Dataset:
    """The MNIST subset shipped in the package: 10,000 training and 2,000 test images.

    They are the first 10,000 images of the official training file and the first 2,000 of the
    test file, with their labels, unmodified. No network and no data folder are needed.

    Returns:
      A `Dataset` with `train` (`uint8[10000, 28, 28]`, labels `uint8[10000]`), an empty `valid`
      and `test` (`uint8[2000, 28, 28]`, labels `uint8[2000]`).
    """
    resource = importlib.resources.files("elbojax") / "_data" / _EMBEDDED_MNIST
    data = resource.read_bytes()
    _check_sha256(
        data, _EMBEDDED_MNIST_SHA256, f"The packaged file elbojax/_data/{_EMBEDDED_MNIST}",
        remedy="Reinstall elbojax.",
    )
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        train = Split(arrays["train_images"], arrays["train_labels"])
        test = Split(arrays["test_images"], arrays["test_labels"])
    return Dataset(train, _empty_like(train), test)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    base_url: str = MNIST_URL,
    num_valid: int = 0,
) -> Dataset:
    """MNIST from `<data_dir>/mnist/` (the four official IDX `.gz` files).

    Args:
      data_dir: the data folder; `None` for `default_data_dir()`.
      download: fetch missing files from `base_url` into the folder. Off by default, so that
        nothing touches the network unless asked.
      base_url: where the files are, ending in `/`.
      num_valid: how many of the last training images to hold out as `valid`. 0 (the default)
        is the 60,000 / 10,000 split of the IWAE paper; 400 is what its code held out.

    Returns:
      A `Dataset` of `uint8[n, 28, 28]` grey levels and `uint8[n]` labels.
    """
    return _load_idx_dataset("mnist", _MNIST_FILES, data_dir, download, base_url, num_valid)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    base_url: str = FASHION_MNIST_URL,
    num_valid: int = 0,
) -> Dataset:
    """Fashion-MNIST from `<data_dir>/fashion-mnist/`; the arguments are those of `load_mnist`."""
    return _load_idx_dataset(
        "fashion-mnist", _FASHION_MNIST_FILES, data_dir, download, base_url, num_valid
    )


def load_binarized_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    base_url: str = BINARIZED_MNIST_URL,
    merge_train_valid: bool = False,
) -> Dataset:
    """The fixed binarized MNIST of Larochelle & Murray from `<data_dir>/binarized_mnist/`.

    Args:
      data_dir, download, base_url: as for `load_mnist`.
      merge_train_valid: train on the 50,000 training and the 10,000 validation images together
        and leave `valid` empty. Off by default: 50,000 / 10,000 / 10,000.

    Returns:
      A `Dataset` of `bool[n, 28, 28]` images; the labels are `None`, as the files carry none.
      (The test images turn out to be one sample of the MNIST test digits sorted by class.)
    """
    merge_train_valid = _check_bool(merge_train_valid, "merge_train_valid")
    files = _read_files("binarized_mnist", _BINARIZED_MNIST_FILES, data_dir, download, base_url)
    train, valid, test = (_parse_binarized_amat(data, source) for data, source in files)
    if merge_train_valid:
        train, valid = np.concatenate([train, valid]), valid[:0]
    return Dataset(Split(train, None), Split(valid, None), Split(test, None))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the format of MNIST, Fashion-MNIST, EMNIST, ...), gzipped or not.

    No checksum is checked here; the loaders check theirs before parsing.

    Returns:
      The array with the shape and (native-endian) dtype that the file's header states.
    """
    path = Path(path).expanduser()
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, path)
    return _parse_idx(data, str(path))


def _load_idx_dataset(folder, files, data_dir, download, base_url, num_valid) -> Dataset:
    num_valid = _check_nonnegative_int(num_valid, "num_valid")
    train_images, train_labels, test_images, test_labels = (
        _parse_idx(_gunzip(data, source), source)
        for data, source in _read_files(folder, files, data_dir, download, base_url)
    )
    if num_valid >= len(train_images):
        raise ValueError(
            f"`num_valid` must be smaller than the {len(train_images)} training images, "
            f"got {num_valid}."
        )
    cut = len(train_images) - num_valid
    return Dataset(
        Split(train_images[:cut], train_labels[:cut]),
        Split(train_images[cut:], train_labels[cut:]),
        Split(test_images, test_labels),
    )


def _empty_like(split: Split) -> Split:
    return Split(split.images[:0], None if split.labels is None else split.labels[:0])


# ----------------------------------------------------------------------------------------------
# Files: look up, download, verify


def _read_files(folder, files, data_dir, download, base_url) -> list[tuple[bytes, str]]:
    """The verified contents of `files` (as distributed, so IDX files are still gzipped)."""
    _check_bool(download, "download")
    if not (isinstance(base_url, str) and base_url.endswith("/")):
        raise ValueError(f"`base_url` must be a URL ending in '/', got {base_url!r}.")
    directory = (default_data_dir() if data_dir is None else Path(data_dir).expanduser()) / folder
    return [_read_file(directory, file, download, base_url) for file in files]


def _read_file(directory: Path, file: _File, download: bool, base_url: str) -> tuple[bytes, str]:
    names = _stored_names(file)
    for name in names:
        path = directory / name
        if path.is_file():
            return _verified(path.read_bytes(), name, file, str(path), _STORED_REMEDY), str(path)
    if not download:
        looked = " or ".join(str(directory / name) for name in names)
        raise FileNotFoundError(
            f"Data file {file.name!r} not found: looked for {looked}. Pass `download=True` to "
            f"fetch it from {base_url}{file.name} into {directory}, or put a copy there (sha256 "
            f"{file.sha256}). The data folder is the `data_dir` argument, else ${DATA_DIR_ENV}, "
            f"else ~/.cache/elbojax."
        )
    return _download(directory, file, base_url)


def _stored_names(file: _File) -> tuple[str, ...]:
    """A file distributed uncompressed may also be kept gzipped."""
    return (file.name,) if file.name.endswith(".gz") else (file.name, file.name + ".gz")


_STORED_REMEDY = "Delete it and load again with `download=True`, or replace it with a good copy."
_DOWNLOAD_REMEDY = "Nothing was stored. Check that `base_url` serves the official files."


def _verified(raw: bytes, stored_name: str, file: _File, source: str, remedy: str) -> bytes:
    """The contents of `file`, stored as `stored_name`, after checking its sha256."""
    if stored_name == file.name:
        data = raw
    else:
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(
                f"{source} is corrupt: it should be a gzipped copy of {file.name} (sha256 "
                f"{file.sha256} once decompressed) but does not decompress ({error}). {remedy}"
            ) from error
    if stored_name != file.name:
        source += " (once decompressed)"
    _check_sha256(data, file.sha256, source, remedy)
    return data


def _download(directory: Path, file: _File, base_url: str) -> tuple[bytes, str]:
    """Fetch the first of `file`'s names that `base_url` has, verify it, then store it."""
    urls = []
    for name in _stored_names(file):
        urls.append(base_url + name)
        raw = _fetch(urls[-1])
        if raw is not None:
            data = _verified(raw, name, file, f"The download {urls[-1]}", _DOWNLOAD_REMEDY)
            directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(directory / name, raw)
            return data, str(directory / name)
    raise FileNotFoundError(
        f"Data file {file.name!r} is not on the server: HTTP 404 for {' and '.join(urls)}."
    )


def _fetch(url: str) -> bytes | None:
    """The body at `url`, or `None` if the server has no such file."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise OSError(f"Downloading {url} failed: HTTP {error.code} {error.reason}.") from error
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, cut transfers
        raise OSError(f"Downloading {url} failed: {error!r}.") from error


def _write_atomically(path: Path, data: bytes) -> None:
    # A reader, or a second process downloading the same file, sees the whole file or none (also
    # the run folder's JSON files and a truncated metrics file: `cli`, `train`).
    # os.open with 0o666 gives the mode a plain write would (the umask applies; mkstemp's is 0600).
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _check_sha256(data: bytes, expected: str, source: str, remedy: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{source} is corrupt or not the expected file: its sha256 is {actual}, expected "
            f"{expected}. {remedy}"
        )


def _gunzip(data: bytes, source) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{source} is not a complete gzip file ({error}).") from error


# ----------------------------------------------------------------------------------------------
# Formats

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _parse_idx(data: bytes, source: str) -> np.ndarray:
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{source} is not an IDX file: its magic number is {data[:4].hex() or 'missing'}, "
            f"expected 0000 then a type code ({', '.join(f'{c:02x}' for c in _IDX_DTYPES)}) and "
            "the number of dimensions, e.g. 00000803 for images."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{source}: the IDX header is cut short ({len(data)} bytes, expected {header})."
        )
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(data) != expected:
        raise ValueError(
            f"{source}: the IDX header states shape {shape} of {dtype.name}, which takes "
            f"{expected} bytes, but the file has {len(data)}."
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _parse_binarized_amat(data: bytes, source: str) -> np.ndarray:
    """Rows of 784 characters `0`/`1` separated by single spaces, each ending in a newline."""
    line = 2 * 28 * 28
    chars = np.frombuffer(data, np.uint8)
    if chars.size and chars.size % line == 0:
        chars = chars.reshape(-1, line)
        digits, separators = chars[:, 0::2], chars[:, 1::2]
        if (
            ((digits | 1) == ord("1")).all()  # "0" is 0x30, "1" is 0x31
            and (separators[:, :-1] == ord(" ")).all()
            and (separators[:, -1] == ord("\n")).all()
        ):
            return (digits == ord("1")).reshape(-1, 28, 28)
    raise ValueError(
        f"{source} is not binarized MNIST in .amat format: expected lines of 784 values 0 or 1 "
        "separated by single spaces."
    )


# ----------------------------------------------------------------------------------------------
# Binarization


def dynamic_binarize(
    images: np.ndarray,
    *,
    seed: int,
    epoch: int,
    step: int,
    dtype: DTypeLike = np.float32,
    rows: slice | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    r"""A fresh binarization of a batch: each pixel $\sim \mathrm{Bernoulli}(\text{grey}/255)$.

    The draw is fixed by `(seed, epoch, step)`, so a resumed run sees the same data; pass the
    position of the batch (`Batch.epoch`, `Batch.step`). This is how the IWAE paper binarized
    MNIST: afresh each time an image is used.

    Args:
      images: `uint8[...]` grey levels 0..255, any shape (a batch, or one image); with `rows`,
        only those rows of the batch.
      seed, epoch, step: non-negative ints.
      dtype: the dtype of the result.
      rows: binarize only these rows of a batch of `batch_size` (`images` holds just them), with
        exactly the draws the whole batch would get: how a process or device that holds a slice
        of a global batch binarizes its slice.
      batch_size: the whole batch's size; required with `rows`.

    Returns:
      An array of 0s and 1s of `images`' shape and dtype `dtype`.
    """
    images = _check_grey_levels(images, "images")
    rng = _rng(_DYNAMIC_STREAM, seed=seed, epoch=epoch, step=step)
    if rows is None:
        if batch_size is not None:
            raise TypeError(
                "`batch_size` is only used with `rows` (the slice of the batch that `images` "
                "holds); without `rows`, `images` is the whole batch."
            )
        return _bernoulli(images, rng, dtype)
    if not isinstance(rows, slice):
        raise TypeError(f"`rows` must be a slice of the batch (e.g. slice(0, 50)), got {type(rows).__name__}.")
    if batch_size is None:
        raise TypeError("`batch_size` (the whole batch's size) is required with `rows`.")
    batch_size = _check_positive(batch_size, "batch_size")
    expected = len(range(batch_size)[rows])
    if images.shape[:1] != (expected,):
        raise ValueError(f"`images` must hold the {expected} rows {rows} of the batch, got shape {images.shape}.")
    u = rng.integers(0, 255, size=(batch_size, *images.shape[1:]), dtype=np.uint8)[rows]
    return (u < images).astype(dtype)


def static_binarize(images: np.ndarray, *, seed: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    r"""One fixed binarization of a data set: each pixel $\sim \mathrm{Bernoulli}(\text{grey}/255)$.

    Drawn once from `seed` and kept for all epochs, as Larochelle & Murray's binarized MNIST was.

    Args:
      images: `uint8[n, ...]` grey levels 0..255.
      seed: a non-negative int.
      dtype: the dtype of the result (`bool` or `np.uint8` keep it small).

    Returns:
      An array of 0s and 1s of `images`' shape.
    """
    return _bernoulli(_check_grey_levels(images, "images"), _rng(_STATIC_STREAM, seed=seed), dtype)


def threshold_binarize(
    images: np.ndarray, *, threshold: float = 0.5, dtype: DTypeLike = np.float32
) -> np.ndarray:
    """1 where `grey > 255 * threshold`, else 0: deterministic, and not a sample of anything.

    Args:
      images: `uint8[...]` grey levels 0..255.
      threshold: a float in [0, 1].
      dtype: the dtype of the result.
    """
    images = _check_grey_levels(images, "images")
    is_number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    if not (is_number and 0 <= threshold <= 1):
        raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
    return (images > threshold * 255).astype(dtype)


def _bernoulli(images: np.ndarray, rng: np.random.Generator, dtype) -> np.ndarray:
    # u is uniform on {0, ..., 254}, so P(u < grey) = grey / 255 exactly, in one byte per pixel.
    u = rng.integers(0, 255, size=images.shape, dtype=np.uint8)
    return (u < images).astype(dtype)


def _check_grey_levels(images: Any, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        hint = (
            " These are binary already." if images.dtype == bool
            else " Probabilities p in [0, 1] convert with `np.round(p * 255).astype(np.uint8)`."
        )
        raise TypeError(
            f"`{name}` must be uint8 grey levels 0..255, got dtype {images.dtype}.{hint}"
        )
    return images


# ----------------------------------------------------------------------------------------------
# Batching


class Batch(NamedTuple):
    """One training batch and its position in the stream.

    Attributes:
      epoch: the epoch, from 0.
      step: the batch's index within the epoch, from 0.
      indices: `int64[batch_size]`, the examples' indices in the training split.
    """

    epoch: int
    step: int
    indices: np.ndarray


def batch_indices(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """The batches of one epoch: a permutation of the examples fixed by `(seed, epoch)`.

    The `num_examples % batch_size` examples at the end of the permutation are left out (others
    each epoch), so every batch has the same shape and a jitted step compiles once.

    Returns:
      `int64[num_examples // batch_size, batch_size]`; row `step` holds that batch's indices.

    Examples:
      >>> batch_indices(0, 0, num_examples=10, batch_size=4).shape
      (2, 4)
    """
    num_examples = _check_positive(num_examples, "num_examples")
    batch_size = _check_positive(batch_size, "batch_size")
    if batch_size > num_examples:
        raise ValueError(
            f"`batch_size` ({batch_size}) must not exceed `num_examples` ({num_examples})."
        )
    order = _rng(_SHUFFLE_STREAM, seed=seed, epoch=epoch).permutation(num_examples)
    num_batches = num_examples // batch_size
    return order[: num_batches * batch_size].reshape(num_batches, batch_size)


def iterate_batches(
    seed: int, num_examples: int, batch_size: int, *, start_epoch: int = 0, start_step: int = 0
) -> Iterator[Batch]:
    """The endless stream of `Batch`es, `batch_indices` epoch after epoch, from any position.

    To resume, checkpoint the position of the next batch to train on, `(batch.epoch,
    batch.step + 1)`, and pass it back as `start_epoch, start_step`; the stream continues exactly
    as it would have. A `start_step` equal to the number of batches per epoch means the start of
    the next epoch.

    Examples:
      >>> import itertools
      >>> first = list(itertools.islice(iterate_batches(0, 10, 4), 5))
      >>> [(b.epoch, b.step) for b in first]
      [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
      >>> resumed = next(iterate_batches(0, 10, 4, start_epoch=1, start_step=1))
      >>> bool((resumed.indices == first[3].indices).all())
      True
    """
    epoch = _check_nonnegative_int(start_epoch, "start_epoch")
    step = _check_nonnegative_int(start_step, "start_step")
    num_batches = len(batch_indices(seed, epoch, num_examples, batch_size))  # checks the rest
    if step > num_batches:
        raise ValueError(
            f"`start_step` must be at most the {num_batches} batches per epoch, got {step}."
        )
    return _batches(seed, num_examples, batch_size, epoch, step)


def _batches(seed, num_examples, batch_size, epoch, step) -> Iterator[Batch]:
    while True:
        order = batch_indices(seed, epoch, num_examples, batch_size)
        for index in range(step, len(order)):
            yield Batch(epoch, index, order[index])
        epoch, step = epoch + 1, 0


def _rng(stream: int, **words: int) -> np.random.Generator:
    return np.random.default_rng([stream, *(check_seed(value, name) for name, value in words.items())])


def check_seed(value: Any, name: str = "seed") -> int:
    """`value` as one 32-bit word: an int in [0, 2**32), the seeds that name distinct streams.

    A larger int would take two words of a NumPy seed sequence and share its stream with another
    seed (the shuffle of seed a + 2**32 b equalled epoch b of seed a); and without x64, JAX's
    `key(s)` keeps the low 32 bits (`key(-1)` is `key(2**32 - 1)`). Both are refused.
    """
    value = _check_nonnegative_int(value, name)
    if value >= 2**32:
        raise ValueError(f"`{name}` must be an int in [0, 2**32), got {value}.")
    return value


# ----------------------------------------------------------------------------------------------
# Checks for the training loop


def check_binary(x: Any, name: str) -> None:
    """Require every value of `x` to be 0 or 1 (a batch for a Bernoulli likelihood).

    Raises:
      TypeError: `x` is not numeric.
      ValueError: `x` holds NaN or a value other than 0 and 1; the message gives the first one,
        its index and how many there are.
    """
    x = _check_numeric(x, name)
    if x.dtype != bool:
        _raise_first(x, (x != 0) & (x != 1), name, "must be binary (every value 0 or 1)")


def check_finite(x: Any, name: str) -> None:
    """Require every value of `x` to be finite (a batch for a Gaussian likelihood).

    Raises:
      TypeError: `x` is not numeric.
      ValueError: `x` holds NaN or an infinity.
    """
    x = _check_numeric(x, name)
    if is_float(x.dtype):
        _raise_first(x, ~np.isfinite(x), name, "must be finite")


def check_for_likelihood(x: Any, likelihood: str, name: str) -> None:
    """Refuse data outside a likelihood's support: binary for `"bernoulli"`, finite for `"gaussian"`."""
    checks = {"bernoulli": check_binary, "gaussian": check_finite}
    if likelihood not in checks:
        raise ValueError(f"`likelihood` must be one of {sorted(checks)}, got {likelihood!r}.")
    checks[likelihood](x, name)


def check_unit_interval(x: Any, name: str) -> None:
    """Require every value of `x` to lie in [0, 1] (a batch of probabilities or grey/255).

    Raises:
      TypeError: `x` is not numeric.
      ValueError: `x` holds NaN or a value outside [0, 1].
    """
    x = _check_numeric(x, name)
    hint = " Grey levels 0..255 must be divided by 255 first." if x.dtype == np.uint8 else ""
    _raise_first(x, ~((x >= 0) & (x <= 1)), name, "must lie in [0, 1]", hint)


def is_float(dtype) -> bool:
    """Whether `dtype` is a floating-point type: NumPy's, or ml_dtypes' (bfloat16, the float8s), which NumPy lists as kind "V"."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def _check_numeric(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "biu" and not is_float(x.dtype):  # bool, int, uint, float
        raise TypeError(f"`{name}` must be a numeric array, got dtype {x.dtype}.")
    if is_float(x.dtype):
        _raise_first(x, np.isnan(x), name, "must not contain NaN")
    return x


def _raise_first(x: np.ndarray, bad: np.ndarray, name: str, requirement: str, hint="") -> None:
    """Raise if any entry of `x` is `bad`, showing the first."""
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{name}` {requirement}; got {x[index]} at index {index} "
            f"({int(bad.sum())} of {x.size} values, shape {x.shape}, dtype {x.dtype}).{hint}"
        )


def _check_int_at_least(value: Any, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an int >= {low}, got {value!r} of type {type(value).__name__}."
        )
    if value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value}.")
    return int(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r} of type {type(value).__name__}.")
    return bool(value)


def _check_nonnegative_int(value: Any, name: str) -> int:
    return _check_int_at_least(value, name, 0)


def _check_positive(value: Any, name: str) -> int:
    return _check_int_at_least(value, name, 1)
