"""First login from Python: check an emailed access code, then set the long-term password.

``verify_code`` only checks (a wrong code counts towards the lock-out);
``set_password`` consumes the code. See ``models.first_login`` for the rules.
"""

from __future__ import annotations

from datetime import datetime

from models.first_login import FirstLoginPolicy
from models.first_login import set_password as _set_password
from models.first_login import verify_code as _verify_code
from models.first_login import verify_password as _verify_password
from models.types import utc_now
from workers.database import raising_unavailable, require_database, session_scope
from workers.settings import get_settings


def first_login_policy() -> FirstLoginPolicy:
    """The first-login rules from the settings (argon2id costs, attempts, password length)."""
    settings = get_settings()
    return FirstLoginPolicy(
        hash_parameters=settings.hash_parameters(),
        max_failed_attempts=settings.access_code_max_attempts,
        password_min_length=settings.password_min_length,
        refusal_key=settings.secret_key_bytes(),
    )


@raising_unavailable
def verify_code(email: str, code: str, *, now: datetime | None = None) -> bool:
    """Whether ``code`` is the current, unexpired, unlocked access code of ``email``."""
    require_database()
    return _verify_code(session_scope, email, code, policy=first_login_policy(), now=now or utc_now())


@raising_unavailable
def set_password(email: str, code: str, new_password: str, *, now: datetime | None = None) -> None:
    """Consume ``email``'s access code and set its password (``AccessCodeRefused``, ``PasswordRefused``)."""
    require_database()
    _set_password(session_scope, email, code, new_password, policy=first_login_policy(), now=now or utc_now())


@raising_unavailable
def verify_password(email: str, password: str) -> bool:
    """Whether ``password`` is ``email``'s long-term password (a weaker hash is rehashed)."""
    require_database()
    return _verify_password(session_scope, email, password, policy=first_login_policy())
