"""Shared test code that is not a fixture (fixtures live in ``tests/conftest.py``).

- :mod:`.tokens`: forging JWTs, good and bad, with keys made on the spot.
- :mod:`.policies`: the example policies, edited as loaded models and written back for a site.
- :mod:`.servers`: talking to running sites and brokers; the test-only ``ExactNoise``.
- :mod:`.data`: reading the synthetic DuckDB files directly, for the exact answers.
- :mod:`.cli`: running the ``gateway`` command as a separate process.
"""
