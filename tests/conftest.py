"""Test configuration: the root conftest.py sets 8 simulated CPU devices; hypothesis profile here."""

from hypothesis import settings

settings.register_profile("cljax", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("cljax")
