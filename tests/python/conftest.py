"""Attaches the modelgate server log to the report of every failing test."""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        server = getattr(item, "funcargs", {}).get("server")
        if server is not None:
            report.sections.append(("modelgate server log (last 200 lines)", server.log()))
