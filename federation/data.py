"""Data for federations: data sets, seeded partitions over clients, and one NumPy batch loader.

Every framework's clients get their batches from :func:`batches`, so with the same seed a torch,
a JAX and a Keras client see the same examples in the same order. Images are canonical
``(N, C, H, W)`` float32, labels ``(N,)`` int64.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "FASHION_MNIST_DIR",
    "Dataset",
    "batches",
    "load_dataset",
    "partition",
]

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


class Dataset(NamedTuple):
    """A classification data set split into train and test, standardised with train statistics."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example's canonical shape ``(C, H, W)``."""
        channels, height, width = self.x_train.shape[1:]
        return channels, height, width

    @classmethod
    def from_arrays(
        cls,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        *,
        name: str = "arrays",
    ) -> Dataset:
        """A data set from user arrays: images ``(N, C, H, W)``, integer labels ``(N,)``.

        The images are standardised with the train set's mean and standard deviation.

        Raises
        ------
        ValueError
            If the shapes do not match that description or each other, or labels are negative.
        """
        x_train, x_test = np.asarray(x_train), np.asarray(x_test)
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
        for label, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            if x.ndim != 4 or y.shape != (len(x),) or len(x) == 0:
                msg = (
                    f"`x_{label}` must be (N, C, H, W) with N > 0 and `y_{label}` (N,); "
                    f"got {x.shape} and {y.shape}."
                )
                raise ValueError(msg)
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
                msg = f"`y_{label}` must hold non-negative integer labels; got dtype {y.dtype}."
                raise ValueError(msg)
        if x_train.shape[1:] != x_test.shape[1:]:
            msg = (
                f"train and test images differ in shape: {x_train.shape[1:]} vs {x_test.shape[1:]}."
            )
            raise ValueError(msg)
        mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
        return cls(
            name,
            ((x_train - mean) / std).astype(np.float32),
            y_train.astype(np.int64),
            ((x_test - mean) / std).astype(np.float32),
            y_test.astype(np.int64),
            int(max(y_train.max(), y_test.max())) + 1,
        )


def load_dataset(name: str, *, seed: int = 0, path: str = "") -> Dataset:
    """Load ``"digits"``, ``"fashion-mnist"`` or ``"npz"`` (the arrays in the file at ``path``).

    ``digits`` is scikit-learn's 8x8 digits (1,797 images), split 80/20 by ``seed``.
    ``fashion-mnist`` reads Debian's ``dataset-fashion-mnist`` files (28x28, 60,000/10,000).
    An ``npz`` file holds ``x_train``, ``y_train``, ``x_test`` and ``y_test``; it is read
    without unpickling.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    FileNotFoundError
        If the Fashion-MNIST files or the npz file are missing; the message says how to get them.
    """
    if name == "digits":
        return _digits(seed)
    if name == "fashion-mnist":
        return _fashion_mnist()
    if name == "npz":
        return _npz(path)
    msg = f"`data.name` must be 'digits', 'fashion-mnist' or 'npz'; got {name!r}."
    raise ValueError(msg)


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits  # only this data set needs it

    digits = load_digits()
    images = digits.images[:, None].astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    test = order[: len(order) // 5]
    train = order[len(order) // 5 :]
    labels = digits.target
    return Dataset.from_arrays(
        images[train], labels[train], images[test], labels[test], name="digits"
    )


def _fashion_mnist() -> Dataset:
    files = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not (FASHION_MNIST_DIR / f).is_file()]
    if missing:
        msg = (
            f"Fashion-MNIST files {missing} are not in {FASHION_MNIST_DIR}; install them with "
            "`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu)."
        )
        raise FileNotFoundError(msg)
    arrays = {key: _read_idx(FASHION_MNIST_DIR / f) for key, f in files.items()}
    return Dataset.from_arrays(
        arrays["x_train"][:, None],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"][:, None],
        arrays["y_test"].astype(np.int64),
        name="fashion-mnist",
    )


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (the MNIST format): a big-endian header of dimension sizes, then uint8 data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _npz(path: str) -> Dataset:
    if not path or not pathlib.Path(path).is_file():
        msg = f"`data.path` must name an .npz file for data.name = 'npz'; got {path!r}."
        raise FileNotFoundError(msg)
    with np.load(path, allow_pickle=False) as arrays:
        keys = ("x_train", "y_train", "x_test", "y_test")
        missing = [k for k in keys if k not in arrays]
        if missing:
            msg = f"the npz file {path} must hold {list(keys)}; missing {missing}."
            raise ValueError(msg)
        return Dataset.from_arrays(*(arrays[k] for k in keys), name=pathlib.Path(path).stem)


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str,
    rng: np.random.Generator,
    beta: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    r"""Split example indices over ``num_clients`` clients; seeded by ``rng``.

    - ``"iid"``: a random permutation cut into near-equal parts.
    - ``"dirichlet"``: for each class :math:`c`, proportions :math:`p_c \sim
      \operatorname{Dir}(\beta \mathbf{1})` over clients, and the class's shuffled examples cut
      by them. Small :math:`\beta` gives few classes per client; clients may get none.
    - ``"shards"``: examples sorted by label, cut into ``num_clients * shards_per_client``
      shards, each client drawing ``shards_per_client`` of them.

    Returns
    -------
    list[numpy.ndarray]
        One int64 index array per client; together they cover every example exactly once.
        Within a client, non-IID indices come grouped by class (as the authors' split stores
        them), which matters only to an unshuffled statistics pass.

    Raises
    ------
    ValueError
        If ``method`` is unknown, or ``num_clients``, ``beta`` or ``shards_per_client`` are out
        of range.
    """
    if num_clients < 1 or num_clients > len(labels):
        msg = f"`num_clients` must be in [1, {len(labels)}] (the examples); got {num_clients}."
        raise ValueError(msg)
    if method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    if method == "dirichlet":
        if not beta > 0:
            msg = f"`beta` must be positive for the Dirichlet partition; got {beta}."
            raise ValueError(msg)
        return _dirichlet(labels, num_clients, beta, rng)
    if method == "shards":
        if shards_per_client < 1 or num_clients * shards_per_client > len(labels):
            msg = (
                f"`shards_per_client` must be >= 1 with num_clients * shards_per_client <= "
                f"{len(labels)}; got {shards_per_client}."
            )
            raise ValueError(msg)
        return _shards(labels, num_clients, shards_per_client, rng)
    msg = f"`partition` must be 'iid', 'dirichlet' or 'shards'; got {method!r}."
    raise ValueError(msg)


def _dirichlet(
    labels: np.ndarray, num_clients: int, beta: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, beta))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(np.sort(piece))
    return [np.concatenate(p).astype(np.int64) for p in parts]


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, num_clients * shards_per_client)
    order = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]).astype(np.int64) for row in order]


def batches(
    x: np.ndarray,
    y: np.ndarray,
    indices: np.ndarray,
    *,
    batch_size: int,
    rng: np.random.Generator | None,
    drop_last: bool = False,
    max_batches: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, labels)`` batches of the examples at ``indices``.

    Shuffled by ``rng`` (``None`` keeps the order of ``indices``). With ``drop_last`` the final
    partial batch is dropped, unless it is the only one: a client with fewer examples than a
    batch still trains on what it has. ``max_batches`` stops early.
    """
    order = indices if rng is None else rng.permutation(indices)
    starts = range(0, len(order), batch_size)
    if drop_last and len(order) >= batch_size:
        starts = range(0, len(order) - batch_size + 1, batch_size)
    for count, start in enumerate(starts):
        if max_batches is not None and count >= max_batches:
            return
        chosen = order[start : start + batch_size]
        yield x[chosen], y[chosen]
