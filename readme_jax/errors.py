"""The one exception family of readme-jax.

Every error a user can cause (bad config, bad checkpoint, bad request) is raised as a
``ReadmeError`` (or a subclass) whose message says what was expected, what was found and
where (file, tensor name, config key).
"""


class ReadmeError(Exception):
    """Base class of every error readme-jax raises on purpose."""


class ConfigError(ReadmeError):
    """A config file or override is invalid (unknown key, bad value, missing path)."""


class CheckpointError(ReadmeError):
    """A checkpoint cannot be read: missing file/tensor, wrong architecture, shape mismatch."""


class DataError(ReadmeError):
    """A text domain or data pipeline cannot produce what was asked."""


class ShapeError(ReadmeError):
    """Arrays given to a public op disagree in shape or index range."""


class RequestError(ReadmeError):
    """A serving request is invalid (empty prompt, too long, bad sampling params)."""


class TrainingError(ReadmeError):
    """Training cannot continue (non-finite loss, bad schedule)."""


class NumericsError(ReadmeError):
    """Weights or results hold NaN/Inf (a corrupt checkpoint, a diverged run)."""
