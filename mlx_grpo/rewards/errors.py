"""The one error type of the rewards package (its own module so every reward file can raise it)."""

from ..errors import UserError


class RewardError(UserError, ValueError):
    """A reward that cannot be loaded, is misconfigured or returned something unusable; the
    message names the reward (and the sample, where one is to blame)."""
