"""Fixtures shared by the test files."""
import signal

import pytest


@pytest.fixture
def ctrl_c_raises():
    "Python's own Ctrl-C handler for the test: a process started in the background (`cmd &` in a script) inherits SIGINT ignored."
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
