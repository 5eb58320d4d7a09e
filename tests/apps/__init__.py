"""Sample apps run by the tests, in this process or as worker subprocesses (``python -m tests.apps.X``)."""
