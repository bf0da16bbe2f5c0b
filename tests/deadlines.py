"""Every test has a deadline, so that a regression fails, never hangs the suite: a test that starts
a server or a subprocess (a broken check can leave one serving, or waiting, forever) names a short
one with @pytest.mark.deadline(SECONDS); any other test gets DEFAULT_DEADLINE, far above the
slowest test on the 2 shared cores of the build machines (docs/reliability.md, "Tests"). Loaded by
tests/conftest.py; a plugin of its own (`-p deadlines`) so that its test can run it on a test file.
"""

import signal

import pytest

DEFAULT_DEADLINE = 900


class DeadlineExceeded(Exception):
    """Raised in a test that ran past its deadline (SIGALRM interrupts a blocking wait too)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): fail the test when its call runs longer than this")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("deadline")
    seconds = marker.args[0] if marker else DEFAULT_DEADLINE

    def expired(signum, frame):
        raise DeadlineExceeded(f"{item.nodeid} ran past its {seconds} s deadline (a hang: a server or subprocess "
                               "that never answered or ended?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

