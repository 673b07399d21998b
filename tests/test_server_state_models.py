"""The server accepts exactly the built-in model names the emulators package can load."""

from offsite.emulators.models import KNOWN_MODELS
from offsite.server.state import BUILTIN_MODELS


def test_server_builtin_models_match_the_loadable_ones():
    assert set(BUILTIN_MODELS) == set(KNOWN_MODELS)
