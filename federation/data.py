"""Data for federations: data sets, seeded partitions over clients, and one NumPy batch loader.

Every framework's clients get their batches from :func:`batches`, so with the same seed a torch,
a JAX and a Keras client see the same examples in the same order. Images are canonical
``(N, C, H, W)`` float32, labels ``(N,)`` int64.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import numbers
import pathlib
import zipfile
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "FASHION_MNIST_DIR",
    "MAX_CLASSES",
    "DataError",
    "Dataset",
    "batches",
    "check_clients_with_data",
    "digits_arrays",
    "load_dataset",
    "partition",
]

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

MAX_CLASSES = 65_536
"""The most classes a data set may have: labels are integers in ``[0, MAX_CLASSES)``."""

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """Data that cannot be used: a bad file, array, label or partition.

    The message names the file or configuration key, what was expected and what was received;
    the command line prints it as one line and exits with status 2.
    """


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
        DataError
            If an array is not as described: images not real numbers of shape ``(N, C, H, W)``
            with ``N > 0``, a NaN or infinite pixel or one beyond float32's range, labels not
            integers in ``[0, MAX_CLASSES)`` of shape ``(N,)``, or train and test images of
            different shapes. The message names the array, and the first bad index.
        """
        return _dataset(
            {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test},
            name=name,
            source="Dataset.from_arrays",
        )


def _dataset(arrays: dict[str, np.ndarray], *, name: str, source: str) -> Dataset:
    """Check the four arrays (``source`` names where they come from), then standardise."""
    for split in ("train", "test"):
        _check_images(f"x_{split}", np.asarray(arrays[f"x_{split}"]), source)
        _check_labels(
            f"y_{split}", np.asarray(arrays[f"y_{split}"]), len(arrays[f"x_{split}"]), source
        )
    x_train, x_test = np.asarray(arrays["x_train"]), np.asarray(arrays["x_test"])
    y_train, y_test = np.asarray(arrays["y_train"]), np.asarray(arrays["y_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        msg = (
            f"{source}: train and test images differ in shape: {x_train.shape[1:]} vs "
            f"{x_test.shape[1:]}."
        )
        raise DataError(msg)
    mean, std = _train_statistics(x_train)
    with np.errstate(over="ignore"):  # overflow is checked, with a clear message, below
        standardised = {
            split: ((x - mean) / std).astype(np.float32)
            for split, x in (("x_train", x_train), ("x_test", x_test))
        }
    for split, x in standardised.items():
        if not np.isfinite(x).all():
            msg = (
                f"{source}: `{split}` standardised with the train images' mean {mean!r} and "
                f"standard deviation {std!r} leaves float32's range; rescale the images."
            )
            raise DataError(msg)
    return Dataset(
        name,
        standardised["x_train"],
        y_train.astype(np.int64),
        standardised["x_test"],
        y_test.astype(np.int64),
        int(max(y_train.max(), y_test.max())) + 1,
    )


def _check_images(key: str, x: np.ndarray, source: str) -> None:
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        msg = f"{source}: `{key}` must hold real numbers; got dtype {x.dtype}."
        raise DataError(msg)
    if x.ndim != 4 or len(x) == 0:
        msg = f"{source}: `{key}` must have shape (N, C, H, W) with N > 0; got {x.shape}."
        raise DataError(msg)
    if np.issubdtype(x.dtype, np.floating):
        bad = ~(np.abs(x) <= _FLOAT32_MAX)  # NaN compares false
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            msg = (
                f"{source}: `{key}` must hold finite pixels within float32's range; got "
                f"{float(x[index])!r} at index {index}."
            )
            raise DataError(msg)


def _check_labels(key: str, y: np.ndarray, examples: int, source: str) -> None:
    if y.shape != (examples,):
        msg = (
            f"{source}: `{key}` must have shape ({examples},), one label per image; got {y.shape}."
        )
        raise DataError(msg)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        msg = f"{source}: `{key}` must hold integer class labels; got dtype {y.dtype}."
        raise DataError(msg)
    bad = (y < 0) | (y >= MAX_CLASSES)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        msg = (
            f"{source}: `{key}` must hold labels in [0, MAX_CLASSES = {MAX_CLASSES}); got "
            f"{int(y[index])} at index {index}."
        )
        raise DataError(msg)


def _train_statistics(x_train: np.ndarray) -> tuple[float, float]:
    """The train images' mean and standard deviation (1 if they are constant).

    In the images' own arithmetic, as always; in float64 where that overflows (float32 images
    of huge values).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(x_train.mean()), float(x_train.std())
    if not (math.isfinite(mean) and math.isfinite(std)):
        mean, std = float(x_train.mean(dtype=np.float64)), float(x_train.std(dtype=np.float64))
    return mean, std or 1.0


def load_dataset(name: str, *, seed: int = 0, path: str = "") -> Dataset:
    """Load ``"digits"``, ``"fashion-mnist"`` or ``"npz"`` (the arrays in the file at ``path``).

    ``digits`` is scikit-learn's 8x8 digits (1,797 images), split 80/20 by ``seed``.
    ``fashion-mnist`` reads Debian's ``dataset-fashion-mnist`` files (28x28, 60,000/10,000).
    An ``npz`` file holds ``x_train``, ``y_train``, ``x_test`` and ``y_test``; it is read
    without unpickling.

    Raises
    ------
    DataError
        If ``name`` is unknown, or the data are unusable (see :meth:`Dataset.from_arrays`); for
        an npz file also if it is not a zip archive, misses a key, or holds an object array
        (which is never unpickled).
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
    raise DataError(msg)


def _digits(seed: int) -> Dataset:
    images64, labels = digits_arrays()
    images = images64[:, None].astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    test = order[: len(order) // 5]
    train = order[len(order) // 5 :]
    return Dataset.from_arrays(
        images[train], labels[train], images[test], labels[test], name="digits"
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``(1797, 8, 8)`` float64 and labels ``(1797,)`` int64.

    The very arrays of :func:`sklearn.datasets.load_digits`, read as it reads them (the
    ``digits.csv.gz`` that scikit-learn ships, by ``numpy.loadtxt``) but without importing
    scikit-learn, which costs seconds in every new process: on a Flower SuperNode, every
    message's ClientApp is one. Where the file is not found, ``load_digits`` itself.

    Raises
    ------
    ModuleNotFoundError
        If scikit-learn is not installed (the ``federation`` extra brings it).
    """
    found = importlib.util.find_spec("sklearn")
    locations = [] if found is None else list(found.submodule_search_locations or [])
    for location in locations:
        path = pathlib.Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as stream:
                table = np.loadtxt(stream, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


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
    source = f"data.path = {path!r}"
    if not zipfile.is_zipfile(path):
        msg = f"{source} must be an .npz file, a zip archive of .npy arrays; it is not a zip file."
        raise DataError(msg)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _NPZ_KEYS if k not in archive]
            if missing:
                msg = f"{source}: the npz file must hold {list(_NPZ_KEYS)}; missing {missing}."
                raise DataError(msg)
            arrays = {key: _npz_array(archive, key, source) for key in _NPZ_KEYS}
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        msg = f"{source}: the npz file cannot be read: {error}."
        raise DataError(msg) from error
    return _dataset(arrays, name=pathlib.Path(path).stem, source=source)


def _npz_array(archive: np.lib.npyio.NpzFile, key: str, source: str) -> np.ndarray:
    try:
        array: np.ndarray = archive[key]
    except ValueError as error:  # an object array (never unpickled), or not a .npy member
        msg = f"{source}: `{key}` cannot be loaded as an array of numbers: {error}"
        raise DataError(msg) from error
    return array


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
    DataError
        If ``method`` is unknown, or ``num_clients``, ``beta`` or ``shards_per_client`` are not
        numbers of the right kind in range: ``1 <= num_clients <= len(labels)``, ``beta``
        finite and positive, ``shards_per_client >= 1`` with ``num_clients *
        shards_per_client <= len(labels)``. The message names the configuration key too.
    """
    examples = len(labels)
    _check_int("num_clients", "data.num_clients", num_clients)
    if not 1 <= num_clients <= examples:
        msg = (
            f"`num_clients` must be in [1, {examples}], the train examples; got {num_clients} "
            "(data.num_clients)."
        )
        raise DataError(msg)
    if method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(examples), num_clients)]
    if method == "dirichlet":
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            msg = f"`beta` must be a number; got {type(beta).__name__} {beta!r} (data.beta)."
            raise DataError(msg)
        if not (beta > 0 and math.isfinite(beta)):
            msg = (
                f"`beta` must be positive and finite for the Dirichlet partition; got {beta} "
                "(data.beta)."
            )
            raise DataError(msg)
        return _dirichlet(labels, num_clients, float(beta), rng)
    if method == "shards":
        _check_int("shards_per_client", "data.shards_per_client", shards_per_client)
        if shards_per_client < 1 or num_clients * shards_per_client > examples:
            msg = (
                f"`shards_per_client` must be >= 1 with num_clients * shards_per_client <= "
                f"{examples}, the train examples; got {shards_per_client} for {num_clients} "
                "clients (data.shards_per_client)."
            )
            raise DataError(msg)
        return _shards(labels, num_clients, shards_per_client, rng)
    msg = f"`partition` must be 'iid', 'dirichlet' or 'shards'; got {method!r} (data.partition)."
    raise DataError(msg)


def _check_int(name: str, key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"`{name}` must be an int; got {type(value).__name__} {value!r} ({key})."
        raise DataError(msg)


def check_clients_with_data(parts: Sequence[np.ndarray], min_clients: int) -> int:
    """Check that at least ``min_clients`` of the partition's clients hold an example.

    Call it on :func:`partition`'s result before any work starts: a Dirichlet partition with a
    small ``beta`` can leave clients empty, and they are never sampled.

    Returns
    -------
    int
        The number of clients with data.

    Raises
    ------
    DataError
        If fewer than ``min_clients`` clients hold data; the message says what to change.
    """
    with_data = sum(1 for part in parts if len(part))
    if with_data < min_clients:
        msg = (
            f"only {with_data} of {len(parts)} clients hold data, fewer than "
            f"clients.min_clients = {min_clients}; lower it, raise data.beta (fewer empty "
            "clients) or use fewer clients."
        )
        raise DataError(msg)
    return with_data


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
