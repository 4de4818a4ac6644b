"""Exceptions of the data layer; all are ValueErrors so callers can catch one family."""


class DataError(ValueError):
    """Base class of every data-layer error."""


class DatasetLayoutError(DataError):
    """A manual directory is missing, malformed or empty; the message lists the expected layout."""


class InvalidExampleError(DataError):
    """An example's pixels are non-finite, out of range or of the wrong shape (names the example id)."""


class SplitExpressionError(DataError):
    """A split expression does not parse, or names a split the dataset does not have (lists the valid ones)."""


class DatasetNotPreparedError(DataError):
    """An official TFDS dataset is not prepared as array_record and cannot be prepared here."""


class PrivacyError(DataError):
    """Code that trains without DP asked for a private dataset, or a private split was tagged public."""


class PrivateSplitError(PrivacyError):
    """A public role names a split its builder declares private (by default, or always)."""


class PrivateOverlapError(PrivacyError):
    """A public role holds an image identical to one of the private set."""
