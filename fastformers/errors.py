"""The one exception type the CLI turns into a single clear error line."""


class FastformersError(Exception):
    """Bad input or config: the message names the field or file and says what to do."""
