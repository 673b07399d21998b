"""Why an evaluation could not run. Its own module so the suite methods (choice,
privacy_methods) and the runner that calls them can all raise it without importing each other."""


class EvalError(RuntimeError):
    """The evaluation could not start (bad model spec, unreadable adapter, ...)."""
