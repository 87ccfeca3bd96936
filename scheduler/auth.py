"""Credentials: organisation API keys and session-scoped tokens.

Organisation keys are configured as SHA-256 digests, so neither the
settings file nor a log ever holds one in clear. A session token is a
short-lived signed claim to one session: it lets whatever holds the end user
attach to that session and nothing else.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import jwt

from shared.errors import Forbidden, NotFound, Unauthorized
from shared.settings import FleetSettings

_ALGORITHM = "HS256"
_AUDIENCE = "acp-fleet/session"


def key_digest(api_key: str) -> str:
    """Return the digest under which an organisation key is configured."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an organisation, or the holder of one session's token."""

    org: str
    session_id: str | None = None

    def may_use(self, session_id: str, owner_org: str) -> bool:
        """True when this caller may read, attach to or cancel the session."""
        if self.org != owner_org:
            return False
        return self.session_id is None or self.session_id == session_id


class Authenticator:
    """Check bearer credentials against the settings."""

    def __init__(self, settings: FleetSettings) -> None:
        self._orgs_by_digest = {
            org.key_sha256: name for name, org in settings.orgs.items()
        }
        self._operators_by_digest = {
            op.key_sha256: name for name, op in settings.operators.items()
        }
        self._secret = settings.token_secret.get_secret_value()
        self.token_ttl_s = settings.scheduler.token_ttl_s

    def org_for_key(self, credential: str | None) -> str:
        """Return the organisation of an API key.

        Raises:
            Forbidden: the credential is an operator key or a session token,
                neither of which acts for an organisation.
            Unauthorized: the credential is missing or unknown.
        """
        digest = key_digest(credential) if credential else None
        if digest in self._orgs_by_digest:
            return self._orgs_by_digest[digest]
        if digest in self._operators_by_digest:
            raise Forbidden(
                "org_key_required",
                "Operator keys do not act for an organisation; this call "
                "needs the organisation's API key.",
            )
        if credential and credential.count(".") == 2:
            self._token_principal(credential)
            raise Forbidden(
                "org_key_required",
                "A session token grants its one session only; this call needs "
                "the organisation's API key.",
            )
        raise _unknown("invalid_credentials", "The API key is missing or unknown")

    def operator_for_key(self, credential: str | None) -> str:
        """Return the operator of an API key.

        Raises:
            Forbidden: the credential is valid, but an organisation's key or
                a session token.
            Unauthorized: the credential is missing or unknown.
        """
        digest = key_digest(credential) if credential else None
        if digest in self._operators_by_digest:
            return self._operators_by_digest[digest]
        known = digest in self._orgs_by_digest
        if not known and credential and credential.count(".") == 2:
            self._token_principal(credential)
            known = True
        if known:
            raise Forbidden(
                "operator_required",
                "This call needs an operator key; organisation keys and "
                "session tokens do not grant it.",
            )
        raise _unknown("operator_required", "This call needs an operator key")

    def is_operator(self, credential: str | None) -> bool:
        """True when ``credential`` is an operator's key."""
        return (
            bool(credential)
            and key_digest(credential or "") in self._operators_by_digest
        )

    def describe(self, credential: str | None) -> str:
        """Name the holder of ``credential`` for logs, never the credential."""
        if not credential:
            return "anonymous"
        if credential.count(".") == 2:
            try:
                principal = self._token_principal(credential)
            except Unauthorized as exc:
                return f"session-token ({exc.code})"
            return f"session-token:{principal.org}/{principal.session_id}"
        digest = key_digest(credential)
        if digest in self._orgs_by_digest:
            return f"org:{self._orgs_by_digest[digest]}"
        if digest in self._operators_by_digest:
            return f"operator:{self._operators_by_digest[digest]}"
        return "unknown-key"

    def principal(self, credential: str | None) -> Principal:
        """Return who presents ``credential``: an org key or a session token."""
        if credential and credential.count(".") == 2:
            return self._token_principal(credential)
        return Principal(org=self.org_for_key(credential))

    def mint(self, session_id: str, org: str) -> tuple[str, int]:
        """Return a token for one session and its expiry in epoch ms."""
        expires_s = int(time.time()) + self.token_ttl_s
        claims = {"sub": session_id, "org": org, "aud": _AUDIENCE, "exp": expires_s}
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), expires_s * 1000

    def _token_principal(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "sub", "org", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized(
                "token_expired", "The session token has expired; create a new one."
            ) from None
        except jwt.InvalidTokenError:
            raise Unauthorized(
                "invalid_token", "The session token is not valid for this fleet."
            ) from None
        return Principal(org=str(claims["org"]), session_id=str(claims["sub"]))


def _unknown(code: str, why: str) -> Unauthorized:
    """The refusal of a missing or unknown credential, saying how to send one."""
    return Unauthorized(code, f"{why}; send it as 'Authorization: Bearer <key>'.")


def require_session(
    principal: Principal, session_id: str, owner_org: str | None
) -> None:
    """Raise ``NotFound`` unless ``principal`` may use the session.

    Another org's session is reported as missing, so that its existence is
    not revealed either.
    """
    if owner_org is None or not principal.may_use(session_id, owner_org):
        raise NotFound("session_not_found", f"No session {session_id} for this caller.")
