"""hbn_core: the math of Hybrid Batch Normalisation, written once over the Python Array API.

Exact per-channel moments and their exact pooling, robust pools that bound the influence of
Byzantine parts, the HBN training forward with its analytic backward, and inference. Every
function takes arrays of one library (NumPy, array-api-strict, PyTorch, JAX or TensorFlow) and
returns arrays of that library (the robust pools: all but TensorFlow); ``import hbn_core``
imports no machine-learning framework.

Conventions
-----------
- ``w = sigmoid(alpha)`` is the weight on the **global** statistics (the paper's convention).
- Normalisation divides by the **biased** (population) variance, in every framework.
- :class:`Moments` holds ``(count, mean, m2)``, never a variance; :func:`variance` states the
  correction: 0 for the population (biased) variance, 1 for the Bessel-corrected one.
"""

from hbn_core._hbn import HBNResiduals, hbn_backward, hbn_forward, hbn_inference
from hbn_core._moments import (
    FLOAT32_MAX,
    MAX_COUNT,
    Moments,
    check_moments,
    merge_moments,
    moments,
    pool_moments,
    variance,
)
from hbn_core._robust import median_of_means_pool, trimmed_pool
from hbn_core._validation import ChannelAxisError

__all__ = [
    "FLOAT32_MAX",
    "MAX_COUNT",
    "ChannelAxisError",
    "HBNResiduals",
    "Moments",
    "check_moments",
    "hbn_backward",
    "hbn_forward",
    "hbn_inference",
    "median_of_means_pool",
    "merge_moments",
    "moments",
    "pool_moments",
    "trimmed_pool",
    "variance",
]
