"""The one error secure aggregation raises: a FloristError, so the CLI prints it as one line."""

from florist_hf.errors import FloristError


class SecureAggregationError(FloristError):
    """The protocol cannot finish (too few replies, a value out of the encodable range, a bad
    message): the message names the stage and the fix, and nothing was aggregated."""
