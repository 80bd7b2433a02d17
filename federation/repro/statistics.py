r"""The statistics of results, defined once: the 95% CI, verdicts, and a run's summary.

Every 95% confidence interval of this library, over the last rounds of one run as over the
seeds of a grid cell, is the Student-t interval :func:`confidence_interval`:
:math:`\bar x \pm t_{0.975,\,n-1}\, s/\sqrt{n}`, with :math:`s` the Bessel-corrected standard
deviation of the :math:`n` values. With fewer than two values it has no half-width.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from federation.protocol import RoundRecord

__all__ = ["Interval", "Summary", "Verdict", "confidence_interval", "summarize", "verdict"]

# A run's reported metric: the mean over this many last evaluated rounds.
LAST_ROUNDS = 10


class Interval(NamedTuple):
    """A mean and its 95% CI half-width (``None`` with fewer than two values)."""

    mean: float
    half_width: float | None


def confidence_interval(values: Sequence[float]) -> Interval:
    r"""The mean of ``values`` and its 95% CI half-width :math:`t_{0.975,n-1}\, s/\sqrt{n}`.

    Raises
    ------
    ValueError
        If ``values`` is empty.
    """
    from scipy import stats

    array = np.asarray(values, np.float64)
    if not len(array):
        msg = "`values` must hold at least one value; got none."
        raise ValueError(msg)
    if len(array) < 2:
        return Interval(float(array.mean()), None)
    half = stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array))
    return Interval(float(array.mean()), float(half))


class Verdict(NamedTuple):
    """A paired comparison: ``"win"``, ``"tie"``, ``"loss"`` or ``"n/a"``, and its interval."""

    outcome: Literal["win", "tie", "loss", "n/a"]
    mean: float
    half_width: float | None


def verdict(ours: Mapping[int, float], theirs: Mapping[int, float]) -> Verdict:
    """``ours`` against ``theirs``, paired by seed: a win or a loss if the CI excludes 0.

    With a single common seed there is no interval, and the verdict is ``"n/a"``.
    """
    seeds = sorted(ours.keys() & theirs.keys())
    mean, half = confidence_interval([ours[s] - theirs[s] for s in seeds])
    if half is None:
        return Verdict("n/a", mean, half)
    if abs(mean) <= half:
        return Verdict("tie", mean, half)
    return Verdict("win" if mean > 0 else "loss", mean, half)


@dataclasses.dataclass(frozen=True)
class Summary:
    """A run's final figures.

    Attributes
    ----------
    rounds
        Rounds committed.
    final_accuracy
        The accuracy of the last evaluated round.
    last10_mean_accuracy, last10_ci95
        The mean accuracy of the last 10 evaluated rounds and its 95% CI half-width
        (:func:`confidence_interval`).
    faults
        Faults recorded over the run.
    last10_mean_personal_accuracy
        FedBN's personalised accuracy, likewise, when ``eval.personal`` is on.
    """

    rounds: int
    final_accuracy: float | None
    last10_mean_accuracy: float | None
    last10_ci95: float | None
    faults: int
    last10_mean_personal_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; without personal accuracy, its key is left out."""
        document = dataclasses.asdict(self)
        if self.last10_mean_personal_accuracy is None:
            del document["last10_mean_personal_accuracy"]
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Summary:
        """The summary a JSON document holds (see :meth:`to_json`).

        Raises
        ------
        ValueError
            If a key is missing or unknown, or a value has the wrong type.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"last10_mean_personal_accuracy"}
        if not required <= set(document) <= fields:
            msg = f"a summary must hold {sorted(required)}; got {sorted(document)}."
            raise ValueError(msg)
        for name, value in document.items():
            whole = name in {"rounds", "faults"}
            valid = isinstance(value, int) if whole else value is None or isinstance(value, float)
            if isinstance(value, bool) or not valid:
                msg = f"the summary's `{name}` must be {'an int' if whole else 'a float'}."
                raise ValueError(msg)
        return cls(**document)


def summarize(history: Sequence[RoundRecord]) -> Summary:
    """The :class:`Summary` of a run's round records."""
    accuracies = [r.accuracy for r in history if r.accuracy is not None]
    personal = [r.personal_accuracy for r in history if r.personal_accuracy is not None]
    mean, half = confidence_interval(accuracies[-LAST_ROUNDS:]) if accuracies else (None, None)
    return Summary(
        rounds=len(history),
        final_accuracy=accuracies[-1] if accuracies else None,
        last10_mean_accuracy=mean,
        last10_ci95=half,
        faults=sum(len(r.faults) for r in history),
        last10_mean_personal_accuracy=(
            float(np.mean(personal[-LAST_ROUNDS:])) if personal else None
        ),
    )
