"""Settings that would break a rule quietly are refused when the service starts.

A reminder window that closes before it opens holds no moment, so every sweep
would postpone every reminder for ever; a delay that is not a finite number of
days cannot be scheduled. Both are configuration errors, named, at start-up.
"""

from __future__ import annotations

import pytest

from workers.settings import Settings


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"REMINDER_WINDOW_START": "18:00", "REMINDER_WINDOW_END": "09:00"}, "REMINDER_WINDOW_START"),
        ({"REMINDER_WINDOW_START": "09:00", "REMINDER_WINDOW_END": "09:00"}, "REMINDER_WINDOW_START"),
        ({"REMINDER_DELAYS_DAYS": "nan"}, "reminder delays"),
        ({"REMINDER_DELAYS_DAYS": "3,inf"}, "reminder delays"),
        ({"REMINDER_DELAYS_DAYS": "3,1e12"}, "reminder delays"),
        ({"REMINDER_DELAYS_DAYS": "7,3"}, "reminder delays"),
        ({"REMINDER_DELAYS_DAYS": "0,3"}, "reminder delays"),
        ({"REMINDER_DELAYS_DAYS": "three"}, "REMINDER_DELAYS_DAYS"),
    ],
)
def test_settings_that_would_stop_reminders_are_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as refused:
        Settings()
    assert named.lower() in str(refused.value).lower(), refused.value


def test_the_accepted_bounds_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDER_WINDOW_START", "00:00")
    monkeypatch.setenv("REMINDER_WINDOW_END", "23:59")
    monkeypatch.setenv("REMINDER_DELAYS_DAYS", "0.5,365")
    settings = Settings()
    assert settings.reminder_delays_days == (0.5, 365.0)
    policy = settings.reminder_policy()
    assert [delay.total_seconds() for delay in policy.delays] == [43_200, 365 * 86_400]
