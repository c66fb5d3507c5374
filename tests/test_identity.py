"""
Tests for L{ocppgw.identity}: the charger identity from the URL path.
"""

from __future__ import annotations

import ast
import inspect
import string
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ocppgw import identity
from ocppgw.identity import BadIdentity, identity_from_path

ALLOWED = string.ascii_letters + string.digits + " *-_=:+|@~!$&'(),;"


class AcceptTests(SynchronousTestCase):
    """
    Identities real chargers use are accepted and percent-decoded.
    """

    def test_plain(self) -> None:
        self.assertEqual(identity_from_path("/ocpp/CP001"), "CP001")

    def test_space(self) -> None:
        """
        The specs' own example, raw and percent-encoded.
        """
        self.assertEqual(identity_from_path("/ocpp/RDAM 123"), "RDAM 123")
        self.assertEqual(identity_from_path("/ocpp/RDAM%20123"), "RDAM 123")

    def test_pipe(self) -> None:
        self.assertEqual(identity_from_path("/ocpp/RDAM%7C123"), "RDAM|123")
        self.assertEqual(identity_from_path("/ocpp/RDAM%7c123"), "RDAM|123")
        self.assertEqual(identity_from_path("/ocpp/RDAM|123"), "RDAM|123")

    def test_evse_id(self) -> None:
        """
        A C{*} inside a word is an ordinary character in a topic key.
        """
        self.assertEqual(identity_from_path("/ocpp/DE*ABC*E123"), "DE*ABC*E123")
        self.assertEqual(identity_from_path("/ocpp/DE%2AABC%2AE123"), "DE*ABC*E123")

    def test_every_allowed_character(self) -> None:
        self.assertEqual(
            identity_from_path("/ocpp/" + quote(ALLOWED, safe=""), max_length=100),
            ALLOWED,
        )

    def test_max_length(self) -> None:
        self.assertEqual(identity_from_path("/ocpp/" + "a" * 48), "a" * 48)
        self.assertEqual(
            identity_from_path("/ocpp/" + "%41" * 48), "A" * 48
        )  # counted after decoding

    def test_configured_max_length(self) -> None:
        self.assertEqual(identity_from_path("/ocpp/abcde", max_length=5), "abcde")
        self.assertRaises(BadIdentity, identity_from_path, "/ocpp/abcdef", max_length=5)

    def test_query_string_ignored(self) -> None:
        self.assertEqual(identity_from_path("/ocpp/CP001?token=a/b.c#d"), "CP001")
        self.assertEqual(identity_from_path("/ocpp/CP001?"), "CP001")

    def test_ws_path(self) -> None:
        self.assertEqual(identity_from_path("/ws/cs/CP1", ws_path="/ws/cs"), "CP1")
        self.assertEqual(identity_from_path("/ws/cs/CP1", ws_path="/ws/cs/"), "CP1")
        self.assertEqual(identity_from_path("/CP1", ws_path="/"), "CP1")
        self.assertEqual(identity_from_path("/CP1", ws_path=""), "CP1")

    def test_vhost_form(self) -> None:
        """
        With a vhost configured, C{/<path>/<vhost>/<identity>} works too; the
        vhost segment is compared after decoding.
        """
        self.assertEqual(identity_from_path("/ocpp/%2F/CP1", vhost="/"), "CP1")
        self.assertEqual(identity_from_path("/ocpp/%2f/CP1", vhost="/"), "CP1")
        self.assertEqual(identity_from_path("/ocpp/prod/CP1", vhost="prod"), "CP1")
        self.assertEqual(identity_from_path("/ocpp/CP1", vhost="prod"), "CP1")
        self.assertEqual(
            identity_from_path("/ocpp/%2F/RDAM%20123", vhost="/"), "RDAM 123"
        )


class RefuseTests(SynchronousTestCase):
    """
    Paths that name no acceptable identity raise L{BadIdentity}.
    """

    def assertBad(self, path: str, reason: str, **kwargs: object) -> BadIdentity:
        bad = self.assertRaises(BadIdentity, identity_from_path, path, **kwargs)
        self.assertIn(reason, str(bad))
        return bad

    def test_is_value_error(self) -> None:
        self.assertTrue(issubclass(BadIdentity, ValueError))

    def test_too_long(self) -> None:
        self.assertBad("/ocpp/" + "a" * 49, "longer than 48")

    def test_empty(self) -> None:
        self.assertBad("/ocpp/", "empty")
        self.assertBad("/ocpp/?x=1", "empty")

    def test_hash(self) -> None:
        self.assertBad("/ocpp/a%23b", "'#'")
        self.assertBad("/ocpp/%23", "'#'")
        self.assertBad("/ocpp/a#b", "'#'")

    def test_wildcard(self) -> None:
        self.assertBad("/ocpp/*", "wildcard")
        self.assertBad("/ocpp/%2A", "wildcard")

    def test_dot(self) -> None:
        self.assertBad("/ocpp/a.b", "'.'")
        self.assertBad("/ocpp/a%2Eb", "'.'")
        self.assertBad("/ocpp/..", "'.'")

    def test_slash(self) -> None:
        self.assertBad("/ocpp/a%2Fb", "'/'")

    def test_percent(self) -> None:
        self.assertBad("/ocpp/a%25b", "'%'")

    def test_control_characters(self) -> None:
        for path in ("/ocpp/a%0D%0Ab", "/ocpp/a%00", "/ocpp/a%7F", "/ocpp/a\tb"):
            self.assertBad(path, "control character")

    def test_other_characters(self) -> None:
        for path in (
            "/ocpp/%C3%A9t%C3%A9",
            "/ocpp/a%22b",
            "/ocpp/a<b",
            "/ocpp/\u00e9",
            "/ocpp/\ud800",
        ):
            self.assertBad(path, "not allowed")

    def test_broken_escape(self) -> None:
        for path in ("/ocpp/%zz", "/ocpp/a%", "/ocpp/a%2", "/ocpp/%+1", "/ocpp/% 1"):
            self.assertBad(path, "broken percent-escape")

    def test_not_utf8(self) -> None:
        for path in ("/ocpp/%C3%28", "/ocpp/%FF", "/ocpp/%C3", "/ocpp/\ud800%41"):
            self.assertBad(path, "not valid UTF-8")

    def test_wrong_prefix(self) -> None:
        for path in ("/other/CP1", "/ocppx/CP1", "/OCPP/CP1", "/ocpp", "ocpp/CP1", ""):
            self.assertBad(path, "does not start with /ocpp/")

    def test_trailing_slash(self) -> None:
        """
        One trailing C{/} is a firmware quirk: the identity before it.
        """
        self.assertEqual(identity_from_path("/ocpp/CP1/"), "CP1")
        self.assertEqual(identity_from_path("/ocpp/CP1/?x=y"), "CP1")
        self.assertEqual(identity_from_path("/ocpp/RDAM%20123/"), "RDAM 123")
        self.assertEqual(identity_from_path("/ocpp/%2F/CP1/", vhost="/"), "CP1")

    def test_trailing_slash_keeps_the_rules(self) -> None:
        """
        The segment before a trailing C{/} is checked like any identity,
        and two slashes are not one.
        """
        self.assertBad("/ocpp/CP1//", "ends with '//'")
        self.assertBad("/ocpp/*/", "wildcard")
        self.assertBad("/ocpp/%23/", "'#'")
        self.assertBad("/ocpp/a.b/", "'.'")
        self.assertBad("/ocpp/a/CP1/", "only segment")
        self.assertBad("/ocpp//", "empty")
        self.assertBad("/ocpp/CP1%2F", "'/'")

    def test_extra_segments(self) -> None:
        self.assertBad("/ocpp/a/CP1", "only segment")
        self.assertBad("/ocpp//CP1", "only segment")
        self.assertBad("/ocpp/%2F/a/CP1", "only segment", vhost="/")

    def test_wrong_vhost(self) -> None:
        self.assertBad("/ocpp/other/CP1", "another virtual host", vhost="/")
        self.assertBad("/ocpp/%2F/CP1", "another virtual host", vhost="prod")
        self.assertBad("/ocpp/%zz/CP1", "broken percent-escape", vhost="/")

    def test_message_never_quotes_the_path(self) -> None:
        """
        Messages are safe for logs and HTTP status lines.
        """
        hostile = "EVIL%0D%0ASet-Cookie:%20x"
        for path in (
            "/ocpp/" + hostile,
            "/ocpp/" + hostile + "/CP1",
            "/ocpp/" + hostile * 10,
            "/x/" + hostile,
            "/ocpp/" + hostile + "%zz",
        ):
            bad = self.assertRaises(BadIdentity, identity_from_path, path, vhost="v")
            self.assertNotIn("EVIL", str(bad))
            self.assertTrue(str(bad).isprintable())


class PurityTests(SynchronousTestCase):
    def test_imports(self) -> None:
        """
        The module imports no network library.
        """
        tree = ast.parse(inspect.getsource(identity))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                self.assertFalse(name.startswith(("twisted", "autobahn", "pika")), name)


def valid_identity(text: str) -> bool:
    return 0 < len(text) <= 48 and text != "*" and set(text) <= set(ALLOWED)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=ALLOWED, min_size=1, max_size=48))
    def test_round_trip(self, ident: str) -> None:
        """
        Every allowed identity survives percent-encoding, however much of it
        is encoded.
        """
        if ident == "*":
            return
        self.assertEqual(identity_from_path("/ocpp/" + quote(ident, safe="")), ident)
        self.assertEqual(
            identity_from_path("/ocpp/" + quote(ident, safe=" *-_=:+|@~!$&'(),;")),
            ident,
        )
        self.assertEqual(
            identity_from_path("/ocpp/%2F/" + quote(ident, safe=""), vhost="/"), ident
        )

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=60))
    def test_arbitrary_identity(self, text: str) -> None:
        """
        Any decoded identity is either accepted unchanged or refused.
        """
        path = "/ocpp/" + quote(text, safe="", errors="surrogatepass")
        try:
            result = identity_from_path(path)
        except BadIdentity:
            self.assertFalse(valid_identity(text))
        else:
            self.assertTrue(valid_identity(text))
            self.assertEqual(result, text)

    @settings(max_examples=500, deadline=None)
    @given(
        st.text(
            alphabet=st.characters(codec="utf-8") | st.sampled_from("/%?#."),
            max_size=80,
        )
    )
    def test_arbitrary_path(self, raw: str) -> None:
        """
        No raw path crashes the parser; what it accepts is a valid identity.
        """
        try:
            result = identity_from_path("/ocpp/" + raw, vhost="/")
        except BadIdentity:
            return
        self.assertTrue(valid_identity(result))
