"""Loads the bundled MNIST test set (t10k) and splits it for the examples.

The files in ``examples/data`` are the original MNIST test set in the gzipped
IDX format (see ``examples/data/README.md``). Only numpy is needed to read
them. The examples use a fixed split of the 10,000 images: 8,000 for training
and 2,000 held out for testing.
"""

import gzip
import os

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
IMAGES_FILE = 'mnist_t10k-images-idx3-ubyte.gz'
LABELS_FILE = 'mnist_t10k-labels-idx1-ubyte.gz'
NUM_TRAIN = 8000
NUM_TEST = 2000

# IDX type codes (third byte of the magic number) that MNIST uses.
_IDX_DTYPES = {0x08: np.dtype(np.uint8)}


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file into a numpy array.

  The IDX header is two zero bytes, a type code, the number of dimensions
  ``n``, then ``n`` big-endian uint32 sizes, followed by the raw data.

  Args:
    path: path to an ``*-ubyte.gz`` file.

  Returns:
    An array with the shape and dtype given in the file header.

  Raises:
    ValueError: if the header is malformed or the data size does not match.
  """
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f'{path}: not an IDX file (bad magic number).')
  type_code, ndim = raw[2], raw[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f'{path}: unsupported IDX type code {type_code:#x}.')
  dtype = _IDX_DTYPES[type_code]
  header_size = 4 + 4 * ndim
  shape = tuple(
      int(d) for d in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4)
  )
  data = np.frombuffer(raw, dtype=dtype, offset=header_size)
  if data.size != int(np.prod(shape)):
    raise ValueError(
        f'{path}: header says shape {shape} but found {data.size} values.'
    )
  return data.reshape(shape)


def load_mnist(data_dir: str = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Loads all 10,000 images and labels of the MNIST test set.

  Args:
    data_dir: folder holding the two gzipped IDX files.

  Returns:
    ``(images, labels)``: float32 images in ``[0, 1]`` of shape
    ``(10000, 28, 28, 1)`` and int32 labels in ``0..9`` of shape ``(10000,)``.
  """
  images = read_idx(os.path.join(data_dir, IMAGES_FILE))
  labels = read_idx(os.path.join(data_dir, LABELS_FILE))
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
        f'{images.shape[0]} images but {labels.shape[0]} labels.'
    )
  images = (images.astype(np.float32) / 255.0)[..., None]
  return images, labels.astype(np.int32)


def train_test_split(
    images: np.ndarray,
    labels: np.ndarray,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Splits the data with a fixed random permutation.

  Args:
    images: array with examples on the leading axis.
    labels: array with one label per example.
    num_train: number of training examples.
    num_test: number of held-out examples.
    seed: seed of the permutation; the same seed gives the same split.

  Returns:
    ``((train_images, train_labels), (test_images, test_labels))``.
  """
  if num_train + num_test > images.shape[0]:
    raise ValueError(
        f'num_train + num_test = {num_train + num_test} is more than the '
        f'{images.shape[0]} examples available.'
    )
  perm = np.random.default_rng(seed).permutation(images.shape[0])
  train_idx = perm[:num_train]
  test_idx = perm[num_train:num_train + num_test]
  return (
      (images[train_idx], labels[train_idx]),
      (images[test_idx], labels[test_idx]),
  )


def load_split(
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Loads MNIST t10k and returns the fixed 8,000 / 2,000 split."""
  return train_test_split(*load_mnist(), seed=seed)


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
):
  """Yields shuffled ``(images, labels)`` batches forever.

  Each epoch uses a new permutation and drops the last incomplete batch, so
  every batch has the same shape and a jitted step compiles once.

  Args:
    images: training images.
    labels: training labels.
    batch_size: examples per batch; at most ``len(images)``.
    seed: seed of the shuffling.

  Yields:
    ``(images, labels)`` numpy arrays with ``batch_size`` examples.
  """
  n = images.shape[0]
  if batch_size > n:
    raise ValueError(f'batch_size {batch_size} > {n} training examples.')
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = perm[start:start + batch_size]
      yield images[idx], labels[idx]
