"""dpwave's data layer: TFDS builders (array_record), privacy-tagged sources, samplers.

``load(DatasetSpec(name, split, privacy=...))`` returns a ``Source``; non-DP code calls
``require_public(source, consumer)``; public stages draw batches with ``ShuffleSampler`` (the DP stage's
Poisson sampler is part of its mechanism: `dpwave.privacy.batch_selection`);
``overlap.check_disjoint`` refuses public sources holding an image of the private set.
"""
from dpwave.data.boundary import require_public
from dpwave.data.builders.mnist5k import mnist5k_arrays
from dpwave.data.errors import (DataError, DatasetLayoutError, DatasetNotPreparedError,
                                InvalidExampleError, PrivacyError, PrivateOverlapError, PrivateSplitError,
                                SplitExpressionError)
from dpwave.data.images import to_float, to_uint8
from dpwave.data.loading import load
from dpwave.data.shuffle import ShuffleSampler
from dpwave.data.source import Source
from dpwave.data.spec import DatasetSpec

__all__ = ["DataError", "DatasetLayoutError", "DatasetNotPreparedError", "DatasetSpec",
           "InvalidExampleError", "PrivacyError", "PrivateOverlapError", "PrivateSplitError",
           "ShuffleSampler", "Source", "SplitExpressionError", "load", "mnist5k_arrays", "require_public",
           "to_float", "to_uint8"]
