"""The implicitlayers benchmark suite.

Run it as a module from the repository root::

    python -m benchmarks run --suite all --device auto --out runs/bench [--quick]

Each suite lives in its own module under :mod:`benchmarks.suites` and returns a
:class:`~benchmarks._types.SuiteResult`; the command line writes one JSON file per suite,
``results.json`` with all of them, ``report.md`` and PNG plots into the output folder.
"""
