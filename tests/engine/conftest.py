"""The engine's tests run on one CPU thread (see tests/conftest.py `one_thread`)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
