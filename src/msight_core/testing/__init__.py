"""Test support: embedded brokers, pytest fixtures and the shared conformance suite.

``msight_core.testing.brokers`` starts real brokers from pinned wheels;
``msight_core.testing.pytest_plugin`` exposes them as fixtures (registered
automatically through the ``pytest11`` entry point); and
``msight_core.testing.conformance.PubSubConformance`` is the suite every
backend passes, usable from users' own tests for their own backends.
"""

__all__ = ["brokers", "conformance", "pytest_plugin"]
