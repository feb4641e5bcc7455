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

from pathlib import Path

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
        # Empty, a sweep still sent one reminder.
        ({"REMINDER_DELAYS_DAYS": ""}, "reminder delays must be one or more"),
        ({"REMINDER_DELAYS_DAYS": ",,"}, "reminder delays must be one or more"),
        # Every retry would wait the cap.
        (
            {"MIN_BACKOFF_MS": "5000", "MAX_BACKOFF_MS": "100"},
            "MIN_BACKOFF_MS must not be over MAX_BACKOFF_MS",
        ),
        (
            {"DELIVER_EMAIL_MIN_BACKOFF_MS": "7200000"},
            "DELIVER_EMAIL_MIN_BACKOFF_MS must not be over DELIVER_EMAIL_MAX_BACKOFF_MS",
        ),
        ({"REDIS_NAMESPACE": ""}, "REDIS_NAMESPACE"),
        # A live worker whose threads are all busy would be read as dead.
        (
            {"MAINTENANCE_INTERVAL_MS": "30000"},
            "MAINTENANCE_INTERVAL_MS must be at most half of HEARTBEAT_TIMEOUT_MS",
        ),
        # SendGrid refuses such a sender: every email would be dead-lettered.
        ({"EMAIL_BACKEND": "sendgrid", "MAIL_FROM": "notanemail"}, "MAIL_FROM must be an address"),
        ({"EMAIL_BACKEND": "sendgrid", "MAIL_FROM": "no-reply@localhost"}, "MAIL_FROM must be an address"),
        # Accepted once, then each failed every new client's send or first login later.
        ({"ACCESS_CODE_TTL_DAYS": "inf"}, "ACCESS_CODE_TTL_DAYS"),
        ({"ACCESS_CODE_TTL_DAYS": "nan"}, "ACCESS_CODE_TTL_DAYS"),
        ({"ACCESS_CODE_TTL_DAYS": "1e9"}, "ACCESS_CODE_TTL_DAYS"),
        ({"ACCESS_CODE_TTL_DAYS": "366"}, "ACCESS_CODE_TTL_DAYS"),
        ({"ARGON2_MEMORY_KIB": "99999999999"}, "ARGON2_MEMORY_KIB"),
        ({"ARGON2_TIME_COST": "1000000"}, "ARGON2_TIME_COST"),
        ({"ARGON2_PARALLELISM": "100000"}, "ARGON2_PARALLELISM"),
        ({"ARGON2_MEMORY_KIB": "8", "ARGON2_PARALLELISM": "2"}, "ARGON2_MEMORY_KIB"),
        ({"SENDGRID_TIMEOUT": "nan"}, "SENDGRID_TIMEOUT"),
        ({"SENDGRID_API_HOST": "ftp://api.sendgrid.com"}, "SENDGRID_API_HOST"),
        ({"SENDGRID_API_HOST": "api.sendgrid.com"}, "SENDGRID_API_HOST"),
        ({"SECRET_KEY": ""}, "SECRET_KEY"),
        ({"SECRET_KEY": "x" * 31}, "SECRET_KEY"),
    ],
)
def test_settings_that_would_fail_later_are_refused(
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
        # The password's digits before its "/" would read as a port: u:12 as host and port.
        ("REDIS_URL", f"redis://u:12/{PASSWORD}@127.0.0.1:6379/0", "REDIS_URL"),
        ("REDIS_URL", f"redis://u:12#{PASSWORD}@127.0.0.1:6379/0", "REDIS_URL"),
        ("BROKER_URL", f"amqp://u:12?{PASSWORD}@127.0.0.1:5672/", "BROKER_URL"),
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


#: A value that must never be printed back, whatever variable it is given to.
MARKER = "Zq9-Marker-Sat"


@pytest.mark.parametrize("name", sorted(field.upper() for field in Settings.model_fields))
def test_no_configuration_error_quotes_the_value(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, MARKER)
    try:
        Settings()
    except ValueError as refused:
        problems = refused.errors(include_input=False, include_url=False)  # type: ignore[attr-defined]
        text = " ".join(str(problem["msg"]) for problem in problems)
        assert MARKER.lower() not in text.lower(), text


def test_the_largest_costs_and_lifetime_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.settings import MAX_ACCESS_CODE_TTL_DAYS, MAX_ARGON2_MEMORY_KIB, SECRET_KEY_MIN_LENGTH

    monkeypatch.setenv("ACCESS_CODE_TTL_DAYS", str(MAX_ACCESS_CODE_TTL_DAYS))
    monkeypatch.setenv("ARGON2_MEMORY_KIB", str(MAX_ARGON2_MEMORY_KIB))
    monkeypatch.setenv("SECRET_KEY", "k" * SECRET_KEY_MIN_LENGTH)
    monkeypatch.setenv("SENDGRID_API_HOST", "http://127.0.0.1:8025/")
    settings = Settings()
    assert settings.access_code_policy().ttl.days == MAX_ACCESS_CODE_TTL_DAYS
    assert settings.sendgrid_api_host == "http://127.0.0.1:8025"


@pytest.mark.parametrize(
    ("content", "problem"), [("", "is empty: remove it"), (f"{MARKER}\n", "at least 32 characters")]
)
def test_a_generated_key_file_left_empty_or_too_short_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, problem: str
) -> None:
    """An empty file is what a process stopped between creating and writing it leaves."""
    from models.errors import ConfigurationError
    from workers import settings as settings_module

    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    # The wait for a concurrent writer, cut short.
    monkeypatch.setattr("workers.settings.clock.sleep", lambda seconds: None)
    (tmp_path / "secret_key").write_text(content)
    settings_module._load_or_create_secret_key.cache_clear()
    with pytest.raises(ConfigurationError) as refused:
        Settings().secret_key_bytes()
    assert problem in str(refused.value), refused.value
    assert MARKER not in str(refused.value)


def test_configuration_errors_name_the_variable_or_let_the_text_name_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``configuration error: VARIABLE: ...`` for one variable; a check of several names
    them in its text (no empty name before a colon), without pydantic's "Value error," prefix."""
    import workers.settings as settings_module
    from workers.cli import main

    def refused(variable: str, value: str) -> list[str]:
        with monkeypatch.context() as scoped:
            scoped.setenv(variable, value)
            scoped.setattr(settings_module, "_settings", None)  # read again, and fail
            assert main(["schema"]) == 3
        return capsys.readouterr().err.splitlines()

    assert refused("REDIS_URL", "http://127.0.0.1:6379/0") == [
        "configuration error: REDIS_URL: REDIS_URL must start with redis://, rediss:// or unix://"
    ]
    # Checked on the whole model (only once every variable is valid on its own).
    assert refused("REMINDER_WINDOW_START", "19:00") == [
        "configuration error: REMINDER_WINDOW_START must be earlier than REMINDER_WINDOW_END "
        "(the window is within one day)"
    ]
