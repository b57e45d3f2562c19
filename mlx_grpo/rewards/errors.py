"""The one error type of the rewards package (its own module so every reward file can raise it)."""


class RewardError(ValueError):
    """A reward that cannot be loaded, is misconfigured or returned something unusable; the
    message names the reward (and the sample, where one is to blame)."""
