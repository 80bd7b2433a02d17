"""federation.data at its boundary: unusable files, arrays, labels and partitions are refused.

Each with one DataError that names the file or key, what was expected and what was received.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from federation import data
from federation.data import MAX_CLASSES, DataError, Dataset


def arrays(**changes: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.normal(size=(6, 1, 4, 4)),
        "y_train": np.arange(6) % 3,
        "x_test": rng.normal(size=(3, 1, 4, 4)),
        "y_test": np.arange(3),
    }
    return {**base, **changes}


def with_pixel(value: float, key: str = "x_train") -> dict[str, np.ndarray]:
    x = arrays()[key].copy()
    x[1, 0, 2, 3] = value
    return arrays(**{key: x})


BAD_ARRAYS = [
    (
        with_pixel(np.nan),
        r"`x_train` must hold finite pixels within float32's range; got nan at index \(1, 0, 2, 3",
    ),
    (
        with_pixel(np.inf, "x_test"),
        r"`x_test` must hold finite pixels .*; got inf at index \(1, 0, 2, 3\)",
    ),
    (with_pixel(-1e39), r"`x_train` must hold finite pixels within float32's range; got -1e\+39"),
    (
        arrays(y_train=np.array([0, 1, 10**12, 0, 1, 2])),
        r"`y_train` must hold labels in \[0, MAX_CLASSES = 65536\); got 1000000000000 at index 2",
    ),
    (
        arrays(y_test=np.array([0, -1, 2])),
        r"`y_test` must hold labels in \[0, .*\); got -1 at index 1",
    ),
    (
        arrays(y_train=np.arange(6) / 2),
        r"`y_train` must hold integer class labels; got dtype float64",
    ),
    (arrays(y_train=np.ones(6, bool)), r"`y_train` must hold integer class labels; got dtype bool"),
    (
        arrays(y_train=np.arange(5)),
        r"`y_train` must have shape \(6,\), one label per image; got \(5,\)",
    ),
    (
        arrays(y_test=np.zeros((3, 1), np.int64)),
        r"`y_test` must have shape \(3,\), one label per image; got \(3, 1\)",
    ),
    (
        arrays(x_train=np.zeros((6, 4, 4))),
        r"`x_train` must have shape \(N, C, H, W\) with N > 0; got \(6, 4, 4\)",
    ),
    (
        arrays(x_train=np.zeros((0, 1, 4, 4)), y_train=np.zeros(0, np.int64)),
        r"`x_train` must have shape \(N, C, H, W\) with N > 0; got \(0, 1, 4, 4\)",
    ),
    (arrays(x_test=np.full((3, 1, 4, 4), "a")), r"`x_test` must hold real numbers; got dtype <U1"),
    (
        arrays(x_test=np.zeros((3, 1, 4, 5))),
        r"train and test images differ in shape: \(1, 4, 4\) vs \(1, 4, 5\)",
    ),
]


@pytest.mark.parametrize(("given", "pattern"), BAD_ARRAYS)
def test_bad_arrays_are_refused_naming_the_array(given, pattern):
    with pytest.raises(DataError, match=r"^Dataset.from_arrays: " + pattern):
        Dataset.from_arrays(**given)


@pytest.mark.parametrize(("given", "pattern"), BAD_ARRAYS)
def test_bad_npz_arrays_are_refused_naming_the_file(tmp_path, given, pattern):
    path = tmp_path / "mine.npz"
    np.savez(path, **given)
    with pytest.raises(DataError, match=rf"^data.path = '{path}': " + pattern):
        data.load_dataset("npz", path=str(path))


def test_a_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_the_largest_label_allowed_is_max_classes_minus_one():
    loaded = Dataset.from_arrays(**arrays(y_test=np.array([0, 1, MAX_CLASSES - 1])))
    assert loaded.num_classes == MAX_CLASSES


def test_huge_finite_float32_pixels_standardise_to_finite_values():
    """float32 images of magnitude 1e30 overflow float32 squares; their statistics do not."""
    rng = np.random.default_rng(1)
    x_train = (rng.normal(size=(6, 1, 4, 4)) * 1e30).astype(np.float32)
    loaded = Dataset.from_arrays(**arrays(x_train=x_train, x_test=x_train[:3]))
    assert np.isfinite(loaded.x_train).all()
    assert abs(float(loaded.x_train.mean())) < 1e-5
    assert abs(float(loaded.x_train.std()) - 1) < 1e-5


def test_test_images_that_standardise_beyond_float32_are_refused():
    x_train = np.zeros((6, 1, 4, 4))
    x_train[0, 0, 0, 0] = 1e-30
    with pytest.raises(DataError, match=r"`x_test` standardised with the train images' mean"):
        Dataset.from_arrays(**arrays(x_train=x_train, x_test=np.full((3, 1, 4, 4), 1e30)))


def test_an_object_array_is_never_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, **arrays(y_train=np.array([0, 1, 2, 0, 1, None], dtype=object)))
    with pytest.raises(
        DataError,
        match=r"`y_train` cannot be loaded as an array of numbers: Object arrays cannot be "
        r"loaded when allow_pickle=False",
    ):
        data.load_dataset("npz", path=str(path))


def test_a_file_that_is_no_zip_archive_is_named_so(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays")
    with pytest.raises(
        DataError, match=r"must be an .npz file, a zip archive of .npy arrays; it is not a zip file"
    ):
        data.load_dataset("npz", path=str(path))


def test_a_zip_member_that_is_no_npy_array_is_named(tmp_path):
    path = tmp_path / "forged.npz"
    np.savez(path, **arrays())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("labels.npy", b"not a .npy header")
    forged = tmp_path / "forged2.npz"
    with zipfile.ZipFile(forged, "w") as archive:
        for key, value in arrays().items():
            if key != "x_test":
                with archive.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array(member, np.asarray(value))
        archive.writestr("x_test.npy", b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"`x_test` cannot be loaded as an array of numbers"):
        data.load_dataset("npz", path=str(forged))


def test_a_missing_key_is_named(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, **{k: v for k, v in arrays().items() if k != "y_test"})
    with pytest.raises(
        DataError,
        match=r"must hold \['x_train', 'y_train', 'x_test', 'y_test'\]; missing \['y_test'\]",
    ):
        data.load_dataset("npz", path=str(path))


def test_an_unknown_data_set_is_a_data_error():
    with pytest.raises(
        DataError, match=r"`data.name` must be 'digits', 'fashion-mnist' or 'npz'; got 'mnist'"
    ):
        data.load_dataset("mnist")


LABELS = np.repeat(np.arange(4), 25)  # 100 examples


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"method": "shards", "shards_per_client": 0},
            r"`shards_per_client` must be >= 1 .* <= 100, the train examples; got 0 for 10 "
            r"clients \(data.shards_per_client\)",
        ),
        (
            {"method": "shards", "shards_per_client": 10000},
            r"`shards_per_client` must be >= 1 .*; got 10000 for 10 clients",
        ),
        (
            {"method": "shards", "shards_per_client": True},
            r"`shards_per_client` must be an int; got bool True \(data.shards_per_client\)",
        ),
        (
            {"method": "iid", "num_clients": 101},
            r"`num_clients` must be in \[1, 100\], the train examples; got 101 "
            r"\(data.num_clients\)",
        ),
        (
            {"method": "iid", "num_clients": 0},
            r"`num_clients` must be in \[1, 100\], the train examples; got 0",
        ),
        (
            {"method": "iid", "num_clients": 2.5},
            r"`num_clients` must be an int; got float 2.5 \(data.num_clients\)",
        ),
        (
            {"method": "dirichlet", "beta": float("inf")},
            r"`beta` must be positive and finite for the Dirichlet partition; got inf "
            r"\(data.beta\)",
        ),
        (
            {"method": "dirichlet", "beta": float("nan")},
            r"`beta` must be positive and finite .*; got nan",
        ),
        (
            {"method": "dirichlet", "beta": "0.5"},
            r"`beta` must be a number; got str '0.5' \(data.beta\)",
        ),
        (
            {"method": "random"},
            r"`partition` must be 'iid', 'dirichlet' or 'shards'; got 'random' "
            r"\(data.partition\)",
        ),
    ],
)
def test_bad_partitions_name_the_key(kwargs, pattern):
    options = {"num_clients": 10, **kwargs}
    num_clients = options.pop("num_clients")
    with pytest.raises(DataError, match=pattern):
        data.partition(LABELS, num_clients, rng=np.random.default_rng(0), **options)


def test_too_few_clients_with_data_are_refused_before_any_work():
    parts = data.partition(LABELS, 10, method="dirichlet", rng=np.random.default_rng(0), beta=1e-3)
    with_data = sum(1 for p in parts if len(p))
    assert with_data < 10
    assert data.check_clients_with_data(parts, with_data) == with_data
    with pytest.raises(
        DataError,
        match=rf"only {with_data} of 10 clients hold data, fewer than clients.min_clients = "
        rf"{with_data + 1}; lower it, raise data.beta",
    ):
        data.check_clients_with_data(parts, with_data + 1)


def test_the_digits_are_scikit_learns_without_importing_scikit_learn(monkeypatch):
    """Read from the file scikit-learn ships, bit for bit; and by load_digits where it is not."""
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from federation.data import digits_arrays

    reference = load_digits()
    images, labels = digits_arrays()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
    assert (images.dtype, labels.dtype) == (np.float64, np.int64)
    code = (
        "import sys; from federation.data import load_dataset; load_dataset('digits'); "
        "print('sklearn' in sys.modules)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert imported.strip() == "False"
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    images, labels = digits_arrays()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
