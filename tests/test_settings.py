"""Settings that would break a rule quietly are refused when the service starts.

A reminder window that closes before it opens holds no moment, so every sweep
would postpone every reminder for ever; a delay that is not a finite number of
days cannot be scheduled. A URL whose password holds an unencoded ``/`` or
``@`` is read with part of the password as its host or port, which every
connection error would then print. A misspelt time zone failed every command
with a traceback. All are configuration errors, named, at start-up, and the
error never quotes the value.
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


#: A password that must never be printed.
PASSWORD = "s3cret-pw"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("REDIS_URL", f"redis://:{PASSWORD}/x@127.0.0.1:6379/0", "REDIS_URL"),
        ("REDIS_URL", "127.0.0.1:6379", "REDIS_URL"),
        ("BROKER_URL", f"amqp://guest:{PASSWORD}/x@127.0.0.1:5672/", "BROKER_URL"),
        ("DATABASE_URL", f"postgresql://bob:pw@{PASSWORD}@127.0.0.1/test", "DATABASE_URL"),
        ("DATABASE_URL", f"mysql://bob:{PASSWORD}@127.0.0.1/test", "DATABASE_URL"),
        ("DATABASE_URL", f"bob:{PASSWORD}@127.0.0.1/test", "DATABASE_URL"),
        ("DISPLAY_TIMEZONE", "Europe/Pariss", "time zone"),
        ("REMINDER_TIMEZONE", "Paris", "time zone"),
    ],
)
def test_unreadable_urls_and_zones_are_refused_without_quoting_them(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as refused:
        Settings()
    problems = refused.value.errors(include_input=False, include_url=False)  # type: ignore[attr-defined]
    text = " ".join(str(problem["msg"]) for problem in problems)
    assert named.lower() in text.lower(), text
    assert PASSWORD not in text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "redis://:p%2Fw%40rd@127.0.0.1:6379/3"),
        ("REDIS_URL", "redis://:p@ss@127.0.0.1:6379/3"),
        ("REDIS_URL", "rediss://default:pw@cache.example.com:6380/0"),
        ("REDIS_URL", "unix:///run/redis.sock?db=2"),
        ("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2Fvhost"),
        ("DATABASE_URL", "postgresql+psycopg://bob:p%40ss@db.example.com:5432/contracts"),
        ("DATABASE_URL", "sqlite:////var/lib/contract-dispatch/cd.db"),
    ],
)
def test_well_formed_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), variable.lower()) is not None
