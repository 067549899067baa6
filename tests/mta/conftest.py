"""On a failing MTA test, show the MTA's log with the failure."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.mta.postfix import Postfix
from tests.mta.sendmail import Sendmail


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            parts = value if isinstance(value, tuple) else (value,)
            for part in parts:
                if isinstance(part, Postfix):
                    report.sections.append(("Postfix maillog", part.log()))
                elif isinstance(part, Sendmail):
                    report.sections.append(("Sendmail log", part.log()))
