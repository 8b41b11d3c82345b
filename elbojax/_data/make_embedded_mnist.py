"""Make `mnist_subset.npz`, the MNIST subset that `elbojax.data.load_embedded_mnist` loads.

It holds the first 10,000 images and labels of the official MNIST training files and the first
2,000 of the test files (indices 0..9999 and 0..1999), pixels and labels unmodified, as `uint8`
arrays `train_images` (10000, 28, 28), `train_labels` (10000,), `test_images` (2000, 28, 28) and
`test_labels` (2000,). The four source files are checked against their sha256 by
`elbojax.data.load_mnist` before they are read.

Run from the repository root, with the folder that holds `mnist/` (default `../shared/data`):

    python elbojax/_data/make_embedded_mnist.py [DATA_DIR]

The zip entries get a fixed timestamp and order, so with the same zlib the output is the same
byte for byte. Its sha256, recorded as `_EMBEDDED_MNIST_SHA256` in `elbojax/data.py`, was
f45a958c04102ebd016b4861764227d102f63744658d3d13f4d84e40e5eb13b8 (1,928,667 bytes) when made
with Python 3.11.7 and numpy 2.4.6.
"""

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from elbojax import data

NUM_TRAIN, NUM_TEST = 10_000, 2_000
OUTPUT = Path(__file__).resolve().parent / "mnist_subset.npz"


def subset(data_dir: Path) -> dict[str, np.ndarray]:
    mnist = data.load_mnist(data_dir)
    return {
        "train_images": mnist.train.images[:NUM_TRAIN],
        "train_labels": mnist.train.labels[:NUM_TRAIN],
        "test_images": mnist.test.images[:NUM_TEST],
        "test_labels": mnist.test.labels[:NUM_TEST],
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like `np.savez_compressed`, but without the current time in the zip entries."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def main() -> None:
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared" / "data"
    arrays = subset(data_dir)
    write_npz(OUTPUT, arrays)
    with np.load(OUTPUT, allow_pickle=False) as saved:
        if not all(np.array_equal(saved[name], array) for name, array in arrays.items()):
            raise SystemExit(f"{OUTPUT} does not read back as written.")
    sha256 = hashlib.sha256(OUTPUT.read_bytes()).hexdigest()
    print(f"{OUTPUT}: {OUTPUT.stat().st_size} bytes, sha256 {sha256}")
    if sha256 != data._EMBEDDED_MNIST_SHA256:
        print(f"Differs from _EMBEDDED_MNIST_SHA256 in elbojax/data.py ({data._EMBEDDED_MNIST_SHA256}).")


if __name__ == "__main__":
    main()
