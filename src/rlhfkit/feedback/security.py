"""Passwords (Argon2id), API tokens, login sessions and CSRF tokens.

Secrets handed to clients (API tokens, session cookies) are random 256-bit values; the
database keeps only their SHA-256 digest, so a leaked database does not leak live
credentials. Passwords go through Argon2id (RFC 9106) via argon2-cffi.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from rlhfkit.feedback.models import ApiToken, LoginSession, User, utcnow

_hasher = PasswordHasher()  # argon2-cffi defaults: Argon2id, RFC 9106 low-memory profile


def use_test_hasher() -> None:
    """Switch to argon2-cffi's CHEAPEST parameters. For test suites only: a real hash costs
    ~0.1-1 s of CPU by design, and tests create many accounts. Hashes stay verifiable either way
    (the parameters are stored in each hash)."""
    global _hasher
    _hasher = PasswordHasher.from_parameters(profiles.CHEAPEST)


_dummy: tuple[PasswordHasher, str] | None = None


def _dummy_hash() -> str:
    """A hash of a random secret made with the current parameters: unknown users are checked
    against it, so they cost as much time (and memory) as known ones."""
    global _dummy
    if _dummy is None or _dummy[0] is not _hasher:
        _dummy = (_hasher, _hasher.hash(new_secret()))
    return _dummy[1]


SESSION_HOURS = 12
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"password must have at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Check `password`; with `stored` None (no such user) run the same check on a dummy hash."""
    if stored is None:
        verify_password(_dummy_hash(), password)
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def create_api_token(session, user: User, name: str = "", expires_days: float | None = None) -> str:
    """Store a new token for `user` and return its secret (shown once); None: never expires."""
    secret = "rk_" + new_secret()
    expires = None if expires_days is None else utcnow() + dt.timedelta(days=expires_days)
    session.add(ApiToken(user_id=user.id, token_hash=digest(secret), name=name[:64], expires_at=expires))
    return secret


def create_login_session(session, user: User) -> tuple[str, str]:
    """Return (cookie secret, csrf token) of a new browser session."""
    secret, csrf = new_secret(), new_secret()
    session.add(LoginSession(user_id=user.id, session_hash=digest(secret), csrf_token=csrf,
                             expires_at=utcnow() + dt.timedelta(hours=SESSION_HOURS)))
    return secret, csrf


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
