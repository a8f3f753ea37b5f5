"""The tradeoff suites: ``story`` (story.py) and ``comprehensive`` (comprehensive.py),
each a function that returns a :class:`~agxguard.lab.report.Report` (import them from
:mod:`agxguard.lab`). common.py holds what both share; backends.py and model_backend.py
are what a child process runs a request on.

Each mode runs in turn; every run happens in a child process (agxguard's one child
runner), so a crash is recorded as what it was and never takes the other results with it.
"""
