"""What the registry raises: each message names what went wrong and what to do."""


class NotFound(LookupError):
    """No row with that id; the message names what was looked up."""


class RegistryUnavailable(ValueError):
    """The registry database cannot be used (bad URL, unreachable, newer schema); nothing was written."""


class Conflict(ValueError):
    """The change contradicts the current state (duplicate name, wrong status, ...)."""
