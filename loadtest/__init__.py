"""chatd load tester: generate, record and replay traffic traces; report and check.

See `loadtest/README.md` for the trace format and the commands.
"""

__all__: list[str] = []
