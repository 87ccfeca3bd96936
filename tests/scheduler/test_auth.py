"""Specification of credentials: organisation keys and session tokens."""

from __future__ import annotations

import time

import jwt
import pytest

from scheduler.auth import Authenticator, Principal, key_digest, require_session
from shared.errors import Forbidden, NotFound, Unauthorized
from shared.settings import FleetSettings

SECRET = "x" * 32
AUDIENCE = "acp-fleet/session"


@pytest.fixture
def auth() -> Authenticator:
    """An authenticator for two orgs, acme (key k1) and beta (key k2), and
    one operator, ops (key o1)."""
    settings = FleetSettings.model_validate(
        {
            "config_version": 1,
            "token_secret": SECRET,
            "orgs": {
                "acme": {
                    "key_sha256": key_digest("k1"),
                    "max_sessions": 2,
                    "sessions_per_minute": 10,
                },
                "beta": {
                    "key_sha256": key_digest("k2"),
                    "max_sessions": 1,
                    "sessions_per_minute": 5,
                },
            },
            "operators": {"ops": {"key_sha256": key_digest("o1")}},
        }
    )
    return Authenticator(settings)


def refusal(auth: Authenticator, credential: str | None) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        auth.principal(credential)
    return caught.value


class TestKeyDigest:
    """key_digest is the SHA-256 hex digest orgs are configured with."""

    def test_known_digest(self) -> None:
        """The digest of 'k1' is its SHA-256 in lower-case hex."""
        assert key_digest("k1") == (
            "6ab9f1eb8f7d3388f4f9d586f66e99fd54080df2c446f0e58668b09c08a16dd0"
        )


class TestAuthenticator:
    """Authenticator maps bearer credentials to principals."""

    @pytest.mark.parametrize(("key", "org"), [("k1", "acme"), ("k2", "beta")])
    def test_org_key(self, auth: Authenticator, key: str, org: str) -> None:
        """An org's key yields that org with no session scope."""
        assert auth.principal(key) == Principal(org=org, session_id=None)

    @pytest.mark.parametrize("key", ["k3", "K1", "", None, key_digest("k1")])
    def test_wrong_or_missing_key(self, auth: Authenticator, key: str | None) -> None:
        """An unknown, empty or missing key is invalid_credentials (401)."""
        refused = refusal(auth, key)

        assert refused.code == "invalid_credentials"
        assert refused.status == 401

    def test_minted_token(self, auth: Authenticator) -> None:
        """A minted token yields its org scoped to its session."""
        before_ms = int(time.time()) * 1000
        token, expires_ms = auth.mint("sess-a", "acme")

        principal = auth.principal(token)

        assert principal == Principal(org="acme", session_id="sess-a")
        assert before_ms + 3600_000 <= expires_ms <= before_ms + 3601_000

    def test_expired_token(self, auth: Authenticator) -> None:
        """A token past its expiry is token_expired."""
        claims = {
            "sub": "sess-a",
            "org": "acme",
            "aud": AUDIENCE,
            "exp": int(time.time()) - 10,
        }
        token = jwt.encode(claims, SECRET, algorithm="HS256")

        refused = refusal(auth, token)

        assert refused.code == "token_expired"
        assert refused.status == 401

    def test_token_of_another_secret(self, auth: Authenticator) -> None:
        """A token signed with another secret is invalid_token."""
        claims = {
            "sub": "sess-a",
            "org": "acme",
            "aud": AUDIENCE,
            "exp": int(time.time()) + 600,
        }
        token = jwt.encode(claims, "y" * 32, algorithm="HS256")

        assert refusal(auth, token).code == "invalid_token"

    def test_token_for_another_audience(self, auth: Authenticator) -> None:
        """A token with the fleet's secret but another audience is invalid_token."""
        claims = {"sub": "s", "org": "acme", "aud": "other", "exp": 2_000_000_000}
        token = jwt.encode(claims, SECRET, algorithm="HS256")

        assert refusal(auth, token).code == "invalid_token"

    def test_unsigned_token(self, auth: Authenticator) -> None:
        """A token with alg 'none' is invalid_token."""
        claims = {"sub": "s", "org": "acme", "aud": AUDIENCE, "exp": 2_000_000_000}
        token = jwt.encode(claims, None, algorithm="none")

        assert refusal(auth, token).code == "invalid_token"


class TestKindsOfCredential:
    """A known credential of the wrong kind is 403; an unknown one is 401."""

    def test_an_operator_key_does_not_act_for_an_org(self, auth: Authenticator) -> None:
        """An operator key where an org key is needed is 403 org_key_required."""
        with pytest.raises(Forbidden) as caught:
            auth.principal("o1")

        assert (caught.value.status, caught.value.code) == (403, "org_key_required")
        assert caught.value.message.startswith(
            "Operator keys do not act for an organisation"
        )

    def test_a_session_token_does_not_act_for_its_org(
        self, auth: Authenticator
    ) -> None:
        """A valid session token where an org key is needed is 403."""
        token, _ = auth.mint("sess-a", "acme")

        with pytest.raises(Forbidden) as caught:
            auth.org_for_key(token)

        assert (caught.value.status, caught.value.code) == (403, "org_key_required")

    @pytest.mark.parametrize("key", ["k1", "k2"])
    def test_an_org_key_is_no_operator_key(self, auth: Authenticator, key: str) -> None:
        """An org key on an operator call is 403 operator_required."""
        with pytest.raises(Forbidden) as caught:
            auth.operator_for_key(key)

        assert (caught.value.status, caught.value.code) == (403, "operator_required")

    def test_a_session_token_is_no_operator_key(self, auth: Authenticator) -> None:
        """A valid session token on an operator call is 403 operator_required."""
        token, _ = auth.mint("sess-a", "acme")

        with pytest.raises(Forbidden) as caught:
            auth.operator_for_key(token)

        assert caught.value.status == 403

    @pytest.mark.parametrize("key", ["o2", "", None, key_digest("o1")])
    def test_an_unknown_key_on_an_operator_call_is_401(
        self, auth: Authenticator, key: str | None
    ) -> None:
        """A missing or unknown key on an operator call is 401 operator_required."""
        with pytest.raises(Unauthorized) as caught:
            auth.operator_for_key(key)

        assert (caught.value.status, caught.value.code) == (401, "operator_required")

    def test_an_operator_key_is_its_operator(self, auth: Authenticator) -> None:
        """An operator's own key names that operator."""
        assert auth.operator_for_key("o1") == "ops"


class TestRequireSession:
    """require_session hides sessions the caller may not use."""

    def test_session_token_for_its_session(self, auth: Authenticator) -> None:
        """A session token may use its own session."""
        token, _ = auth.mint("sess-a", "acme")

        require_session(auth.principal(token), "sess-a", "acme")

    def test_org_key_for_its_sessions(self, auth: Authenticator) -> None:
        """An org key may use any of its org's sessions."""
        require_session(auth.principal("k1"), "sess-b", "acme")

    def test_session_token_for_another_session(self, auth: Authenticator) -> None:
        """Session A's token used for session B is NotFound."""
        token, _ = auth.mint("sess-a", "acme")
        principal = auth.principal(token)

        with pytest.raises(NotFound) as caught:
            require_session(principal, "sess-b", "acme")

        assert caught.value.code == "session_not_found"
        assert caught.value.status == 404

    def test_another_orgs_key(self, auth: Authenticator) -> None:
        """Another org's key is NotFound, not a refusal that reveals the session."""
        principal = auth.principal("k2")

        with pytest.raises(NotFound):
            require_session(principal, "sess-a", "acme")

    def test_another_orgs_token(self, auth: Authenticator) -> None:
        """A token minted for another org's session of the same id is NotFound."""
        token, _ = auth.mint("sess-a", "beta")

        with pytest.raises(NotFound):
            require_session(auth.principal(token), "sess-a", "acme")

    def test_missing_session(self, auth: Authenticator) -> None:
        """A session with no owner (no record) is NotFound."""
        with pytest.raises(NotFound):
            require_session(auth.principal("k1"), "sess-a", None)
