"""
Tests for L{ocppgw.config}: defaults, every key, every kind of refusal, and
the generated documentation staying equal to the shipped files.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
import re
import socket
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from ocppgw import config
from ocppgw.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent

#: A readable file for the keys that name files (their content is read
#: when the gateway starts, not by the configuration).
A_FILE = str(ROOT / "setup.cfg")

#: An INI file that sets every key to a value other than its default,
#: except the keys of classic queues only (L{EVERY_KEY} has quorum queues):
#: L{CLASSIC_QUEUE_KEYS} sets those.
EVERY_KEY = f"""\
[listener]
tcp.ip = ::1
tcp.port = 29520
ws_path = /csms/ocpp
vhost = /
subprotocols = ocpp2.1,ocpp2.0.1 ocpp1.6
default_subprotocol = ocpp1.6
max_connections = 5000
max_identity_length = 20
accept_rate = 250.5
accept_burst = 7
max_handshakes = 64
max_opening = 250
retry_after_max = 30
drain_window = 0
workers = 4
worker_affinity = source_address
tcp.enabled = false
tcp.profile = 1
ssl.enabled = true
ssl.ip = ::
ssl.port = 29521
ssl.profile = 3
ssl.default_subprotocol = ocpp2.0.1
ssl.min_version = TLSv1
ssl.ciphers = DEFAULT:@SECLEVEL=0
ssl.certfile = {A_FILE}
ssl.keyfile = {A_FILE}
ssl.password_file = {A_FILE}
ssl.alt_certfile = {A_FILE}
ssl.alt_keyfile = {A_FILE}
ssl.cacertfile = {A_FILE}
ssl.crlfile = {A_FILE}
ssl.verify = verify_peer
ssl.fail_if_no_peer_cert = false
ssl.identity = map
ssl.organization = Example CPO
ssl.identity_map = {A_FILE}
ssl.session_tickets = false
ssl.session_cache = off
ssl.session_timeout = 300
proxy_protocol = yes
client_cert_header = X-SSL-Client-Cert
trusted_proxies = 10.0.0.0/8, ::1
allow_anonymous = yes

[websocket]
ws_opts.max_frame_size = 65536
ws_opts.idle_timeout = 0
ws_opts.compress = true
ping_timeout = 2.5
handshake_timeout = 4
close_timeout = 0.5
max_bad_frames = 3
max_message_rate = 20
message_burst = 5
max_rate_violations = 9

[amqp]
url = amqps://gw:s3cret@broker.example.com:5671/ocpp
exchange = ocpp.test
prefetch_count = 1
heartbeat = 0
connect_timeout = 1.5
confirm_window = 10
publish_channels = 2
consumer_channels = 8
declare_channels = 3
node = gw-1
failover_urls = amqp://gw:s3cret@b2:5672/ocpp, amqp://b3/ocpp
outage_grace = 0
outage_keep_chargers = yes
reconnect_max_delay = 4
topology_check_interval = 0
owed_presence_max = 10

[queue]
x-queue-type = quorum
x-message-ttl = 0
x-expires = 60000
x-dead-letter-exchange = ocpp.dead
x-single-active-consumer = true

[ocpp]
call_timeout = 12.5
max_message_id_length = 255
offline_status = no
presence_events = off

[auth]
checker = http
password_file = {A_FILE}
http.url = https://csms.example.com/auth/user
amqp.url = amqp://broker.example.com/chargers
timeout = 2
cache_ttl = 0
failure_delay = 0.25
hash_threads = 4

[validation]
mode = enforce
exempt_actions = DataTransfer, FirmwareStatusNotification
exempt_identities = LAB-*, RDAM?123
allow_additional_properties = yes
schema_dir = /

[admin]
enabled = no
tcp.ip = 0.0.0.0
tcp.port = 9200
username = ops
password = hunter2

[log]
format = json
level = warn

[audit]
enabled = yes
exchange = ocpp.trail
"""


class ParseErrorMixin:
    """Helpers that assert on the message of a refused configuration."""

    def assertRefused(self, values: dict, expected: str) -> None:
        """
        L{config.settings_from_dict} refuses C{values} with exactly one
        problem, C{expected}.
        """
        error = self.assertRaises(ConfigError, config.settings_from_dict, values)
        self.assertEqual(error.problems, (expected,))

    def assertParseRefused(self, text: str, *expected: str) -> None:
        """L{config.parse} refuses C{text} with exactly the C{expected} problems."""
        error = self.assertRaises(ConfigError, config.parse, text)
        self.assertEqual(error.problems, expected)


#: The keys that apply to classic queues only, set to other than their defaults.
CLASSIC_QUEUE_KEYS = """\
[queue]
x-queue-type = classic
x-queue-version = 2
x-queue-mode = lazy
"""
CLASSIC_ONLY = ("x-queue-version", "x-queue-mode")


class DefaultsTests(SynchronousTestCase):
    """An empty file gives the documented defaults."""

    def test_defaults(self) -> None:
        settings = config.defaults()
        self.assertEqual(
            settings.listener,
            config.ListenerSettings(
                tcp_ip="127.0.0.1",
                tcp_port=19520,
                ws_path="/ocpp",
                vhost="",
                subprotocols=("ocpp1.6", "ocpp2.0", "ocpp2.0.1", "ocpp2.1"),
                default_subprotocol="",
                max_connections=100000,
                max_identity_length=48,
                accept_rate=0.0,
                accept_burst=100,
                max_handshakes=0,
                max_opening=1000,
                retry_after_max=10,
                drain_window=10.0,
                workers=1,
                worker_affinity="none",
                tcp_enabled=True,
                tcp_profile=0,
                ssl_enabled=False,
                ssl_ip="127.0.0.1",
                ssl_port=19521,
                ssl_profile=2,
                ssl_default_subprotocol="",
                ssl_min_version="TLSv1.2",
                ssl_ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:"
                "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:"
                "AES256-GCM-SHA384:AES128-GCM-SHA256",
                ssl_certfile="",
                ssl_keyfile="",
                ssl_password_file="",
                ssl_alt_certfile="",
                ssl_alt_keyfile="",
                ssl_cacertfile="",
                ssl_crlfile="",
                ssl_verify="",
                ssl_fail_if_no_peer_cert=True,
                ssl_identity="cn",
                ssl_organization="",
                ssl_identity_map="",
                ssl_session_tickets=True,
                ssl_session_cache=True,
                ssl_session_timeout=7200.0,
                proxy_protocol=False,
                client_cert_header="",
                trusted_proxies=("127.0.0.0/8", "::1"),
                allow_anonymous=False,
            ),
        )
        self.assertEqual(
            settings.websocket,
            config.WebSocketSettings(
                ws_opts_max_frame_size=1048576,
                ws_opts_idle_timeout=60.0,
                ws_opts_compress=False,
                ping_timeout=30.0,
                handshake_timeout=30.0,
                close_timeout=5.0,
                max_bad_frames=10,
                max_message_rate=0.0,
                message_burst=50,
                max_rate_violations=200,
            ),
        )
        self.assertEqual(
            settings.amqp,
            config.AmqpSettings(
                url="amqp://guest:guest@127.0.0.1:5672/%2F",
                exchange="ocpp",
                prefetch_count=10,
                heartbeat=60,
                connect_timeout=10.0,
                confirm_window=10000,
                publish_channels=1,
                consumer_channels=4,
                declare_channels=32,
                node=f"{socket.gethostname()}:{os.getpid()}",
                failover_urls=(),
                outage_grace=30.0,
                outage_keep_chargers=False,
                reconnect_max_delay=30.0,
                topology_check_interval=15.0,
                owed_presence_max=100000,
            ),
        )
        self.assertEqual(
            settings.queue,
            config.QueueSettings(
                x_queue_type="classic",
                x_queue_version=0,
                x_queue_mode="",
                x_message_ttl=300000,
                x_expires=604800000,
                x_dead_letter_exchange="",
                x_single_active_consumer=False,
            ),
        )
        self.assertEqual(
            settings.ocpp,
            config.OcppSettings(
                call_timeout=30.0,
                max_message_id_length=36,
                offline_status=True,
                presence_events=True,
            ),
        )
        self.assertEqual(
            settings.validation,
            config.ValidationSettings(
                mode="warn",
                exempt_actions=(),
                exempt_identities=(),
                allow_additional_properties=False,
                schema_dir="",
            ),
        )

    def test_emptyText(self) -> None:
        """Parsing an empty file, or only empty sections, gives the defaults."""
        self.assertEqual(config.parse(""), config.defaults())
        self.assertEqual(config.parse("[listener]\n[ocpp]\n"), config.defaults())

    def test_settingsAreFrozenWithSlots(self) -> None:
        """Settings cannot be changed after start, and cost no per-instance dict."""
        settings = config.defaults()
        with self.assertRaises(dataclasses.FrozenInstanceError):
            settings.listener.tcp_port = 1  # type: ignore[misc]
        for section in (settings, settings.listener, settings.amqp):
            self.assertFalse(hasattr(section, "__dict__"))

    def test_tableMatchesDataclasses(self) -> None:
        """
        Every option has a field on its section's dataclass and the other
        way round, and L{config.Settings} has one field per section, so a
        row added to the table without its field (or the reverse) fails here.
        """
        self.assertEqual(
            [f.name for f in dataclasses.fields(config.Settings)],
            [section.name for section in config.SECTIONS],
        )
        for section in config.SECTIONS:
            self.assertEqual(
                [f.name for f in dataclasses.fields(section.settings)],
                [option.field for option in section.options],
            )

    def test_fieldNames(self) -> None:
        """Field names are the keys with dots and dashes turned into underscores."""
        self.assertEqual(config.SECTIONS[0].option("tcp.port").field, "tcp_port")
        queue = config.SECTIONS[3]
        self.assertEqual(queue.option("x-message-ttl").field, "x_message_ttl")
        self.assertIsNone(queue.option("nope"))


class EveryKeyTests(SynchronousTestCase):
    """Every key is read, typed and checked."""

    def test_everyKey(self) -> None:
        settings = config.parse(EVERY_KEY)
        self.assertEqual(
            settings.listener,
            config.ListenerSettings(
                tcp_ip="::1",
                tcp_port=29520,
                ws_path="/csms/ocpp",
                vhost="/",
                subprotocols=("ocpp2.1", "ocpp2.0.1", "ocpp1.6"),
                default_subprotocol="ocpp1.6",
                max_connections=5000,
                max_identity_length=20,
                accept_rate=250.5,
                accept_burst=7,
                max_handshakes=64,
                max_opening=250,
                retry_after_max=30,
                drain_window=0.0,
                workers=4,
                worker_affinity="source_address",
                tcp_enabled=False,
                tcp_profile=1,
                ssl_enabled=True,
                ssl_ip="::",
                ssl_port=29521,
                ssl_profile=3,
                ssl_default_subprotocol="ocpp2.0.1",
                ssl_min_version="TLSv1",
                ssl_ciphers="DEFAULT:@SECLEVEL=0",
                ssl_certfile=A_FILE,
                ssl_keyfile=A_FILE,
                ssl_password_file=A_FILE,
                ssl_alt_certfile=A_FILE,
                ssl_alt_keyfile=A_FILE,
                ssl_cacertfile=A_FILE,
                ssl_crlfile=A_FILE,
                ssl_verify="verify_peer",
                ssl_fail_if_no_peer_cert=False,
                ssl_identity="map",
                ssl_organization="Example CPO",
                ssl_identity_map=A_FILE,
                ssl_session_tickets=False,
                ssl_session_cache=False,
                ssl_session_timeout=300.0,
                proxy_protocol=True,
                client_cert_header="X-SSL-Client-Cert",
                trusted_proxies=("10.0.0.0/8", "::1"),
                allow_anonymous=True,
            ),
        )
        self.assertEqual(
            settings.auth,
            config.AuthSettings(
                checker="http",
                password_file=A_FILE,
                http_url="https://csms.example.com/auth/user",
                amqp_url="amqp://broker.example.com/chargers",
                timeout=2.0,
                cache_ttl=0.0,
                failure_delay=0.25,
                hash_threads=4,
            ),
        )
        self.assertEqual(
            settings.websocket,
            config.WebSocketSettings(
                ws_opts_max_frame_size=65536,
                ws_opts_idle_timeout=0.0,
                ws_opts_compress=True,
                ping_timeout=2.5,
                handshake_timeout=4.0,
                close_timeout=0.5,
                max_bad_frames=3,
                max_message_rate=20.0,
                message_burst=5,
                max_rate_violations=9,
            ),
        )
        self.assertEqual(
            settings.amqp,
            config.AmqpSettings(
                url="amqps://gw:s3cret@broker.example.com:5671/ocpp",
                exchange="ocpp.test",
                prefetch_count=1,
                heartbeat=0,
                connect_timeout=1.5,
                confirm_window=10,
                publish_channels=2,
                consumer_channels=8,
                declare_channels=3,
                node="gw-1",
                failover_urls=("amqp://gw:s3cret@b2:5672/ocpp", "amqp://b3/ocpp"),
                outage_grace=0.0,
                outage_keep_chargers=True,
                reconnect_max_delay=4.0,
                topology_check_interval=0.0,
                owed_presence_max=10,
            ),
        )
        self.assertEqual(
            settings.queue,
            config.QueueSettings(
                x_queue_type="quorum",
                x_queue_version=0,
                x_queue_mode="",
                x_message_ttl=0,
                x_expires=60000,
                x_dead_letter_exchange="ocpp.dead",
                x_single_active_consumer=True,
            ),
        )
        self.assertEqual(
            settings.ocpp,
            config.OcppSettings(
                call_timeout=12.5,
                max_message_id_length=255,
                offline_status=False,
                presence_events=False,
            ),
        )
        self.assertEqual(
            settings.validation,
            config.ValidationSettings(
                mode="enforce",
                exempt_actions=("DataTransfer", "FirmwareStatusNotification"),
                exempt_identities=("LAB-*", "RDAM?123"),
                allow_additional_properties=True,
                schema_dir="/",
            ),
        )

    def test_everyKeyIsCovered(self) -> None:
        """L{EVERY_KEY} really sets every key to something else than the default."""
        every, classic = config.parse(EVERY_KEY), config.parse(CLASSIC_QUEUE_KEYS)
        default = config.defaults()
        for section in config.SECTIONS:
            for option in section.options:
                settings = (classic if section.name == "queue" and option.key in CLASSIC_ONLY
                            else every)
                self.assertNotEqual(
                    getattr(getattr(settings, section.name), option.field),
                    getattr(getattr(default, section.name), option.field),
                    f"{section.name}.{option.key}",
                )

    def test_typedValues(self) -> None:
        """L{config.settings_from_dict} takes typed values as well as INI text."""
        settings = config.settings_from_dict(
            {
                "listener": {"tcp.port": 0, "subprotocols": ["ocpp2.0.1"]},
                "websocket": {"ping_timeout": 1, "close_timeout": 0.25},
                "ocpp": {"offline_status": False, "presence_events": "yes"},
            }
        )
        self.assertEqual(settings.listener.tcp_port, 0)
        self.assertEqual(settings.listener.subprotocols, ("ocpp2.0.1",))
        self.assertEqual(settings.websocket.ping_timeout, 1.0)
        self.assertIsInstance(settings.websocket.ping_timeout, float)
        self.assertEqual(settings.websocket.close_timeout, 0.25)
        self.assertFalse(settings.ocpp.offline_status)
        self.assertTrue(settings.ocpp.presence_events)

    def test_booleans(self) -> None:
        """Every spelling configparser knows, in any case."""
        for text, expected in [
            ("true", True),
            ("YES", True),
            ("on", True),
            ("1", True),
            ("false", False),
            ("No", False),
            ("off", False),
            ("0", False),
        ]:
            settings = config.parse(f"[ocpp]\noffline_status = {text}\n")
            self.assertIs(settings.ocpp.offline_status, expected, text)

    def test_hosts(self) -> None:
        """IPv4, IPv6 and host names are accepted as listener address."""
        for host in ["0.0.0.0", "::", "fe80::1%eth0", "localhost", "gw-1.example.com"]:
            settings = config.settings_from_dict(
                {"listener": {"tcp.ip": host, "allow_anonymous": "true"}}
            )
            self.assertEqual(settings.listener.tcp_ip, host)

    def test_emptyNodeIsHostName(self) -> None:
        """An empty node name means this host's name."""
        settings = config.parse("[amqp]\nnode =\n")
        self.assertEqual(settings.amqp.node, f"{socket.gethostname()}:{os.getpid()}")

    def test_inlineComments(self) -> None:
        """C{#} and C{;} after whitespace start a comment; within a value they do not."""
        settings = config.parse(
            "# comment\n[listener]\ntcp.port = 1234 ; the port\nws_path = /a;b # path\n"
        )
        self.assertEqual(settings.listener.tcp_port, 1234)
        self.assertEqual(settings.listener.ws_path, "/a;b")

    def test_urlIsNotInterpolated(self) -> None:
        """C{%} in a URL is kept as is (no configparser interpolation)."""
        settings = config.parse("[amqp]\nurl = amqp://u:p%40x@h/%2F\n")
        self.assertEqual(settings.amqp.url, "amqp://u:p%40x@h/%2F")

    def test_urlNotInRepr(self) -> None:
        """Settings can be logged without leaking the broker password."""
        settings = config.parse(EVERY_KEY)
        self.assertNotIn("s3cret", repr(settings))


class QueueArgumentsTests(SynchronousTestCase):
    """L{config.Settings.queue_arguments} passes on the arguments that are set."""

    def test_defaults(self) -> None:
        self.assertEqual(
            config.defaults().queue_arguments(),
            {
                "x-queue-type": "classic",
                "x-message-ttl": 300000,
                "x-expires": 604800000,
            },
        )

    def test_zeroAndEmptyAreLeftOut(self) -> None:
        settings = config.settings_from_dict(
            {
                "queue": {
                    "x-message-ttl": 0,
                    "x-expires": 0,
                    "x-dead-letter-exchange": "",
                }
            }
        )
        self.assertEqual(settings.queue_arguments(), {"x-queue-type": "classic"})

    def test_classicQueueArguments(self) -> None:
        """The storage version and mode of classic queues go out as integer and word."""
        self.assertEqual(
            config.parse(CLASSIC_QUEUE_KEYS).queue_arguments(),
            {
                "x-queue-type": "classic",
                "x-queue-version": 2,
                "x-queue-mode": "lazy",
                "x-message-ttl": 300000,
                "x-expires": 604800000,
            },
        )

    def test_everyArgument(self) -> None:
        self.assertEqual(
            config.parse(EVERY_KEY).queue_arguments(),
            {
                "x-queue-type": "quorum",
                "x-expires": 60000,
                "x-dead-letter-exchange": "ocpp.dead",
                "x-single-active-consumer": True,
            },
        )


class RefusalTests(ParseErrorMixin, SynchronousTestCase):
    """Each bad value is refused with ``section.key: reason``."""

    def test_unknownSection(self) -> None:
        self.assertParseRefused(
            "[listner]\n", "listner: unknown section (did you mean listener?)"
        )
        self.assertParseRefused("[tls]\n", "tls: unknown section")

    def test_defaultSectionIsUnknown(self) -> None:
        """
        A C{[DEFAULT]} section would apply its keys to every section; it is
        refused instead.
        """
        self.assertParseRefused("[DEFAULT]\ntcp.port = 1\n", "DEFAULT: unknown section")

    def test_unknownKey(self) -> None:
        self.assertParseRefused(
            "[listener]\ntcp_port = 1\n",
            "listener.tcp_port: unknown key (did you mean tcp.port?)",
        )
        self.assertParseRefused("[amqp]\nfoo = 1\n", "amqp.foo: unknown key")

    def test_keysAreCaseSensitive(self) -> None:
        self.assertParseRefused(
            "[listener]\nTCP.port = 1\n",
            "listener.TCP.port: unknown key (did you mean tcp.port?)",
        )

    def test_badPort(self) -> None:
        for port in ["70000", "-1", "65536"]:
            self.assertParseRefused(
                f"[listener]\ntcp.port = {port}\n",
                f"listener.tcp.port: {port} is not a port (1-65535, or 0 for any free port)",
            )

    def test_nonInteger(self) -> None:
        for text in ["ten", "1.5", "1e3", "0x10"]:
            self.assertParseRefused(
                f"[websocket]\nmax_bad_frames = {text}\n",
                f"websocket.max_bad_frames: {text} is not an integer >= 1",
            )
        self.assertRefused(
            {"websocket": {"max_bad_frames": True}},
            "websocket.max_bad_frames: True is not an integer >= 1",
        )

    def test_emptyValue(self) -> None:
        """An empty value is refused where the option gives it no meaning."""
        self.assertParseRefused(
            "[listener]\nmax_connections =\n",
            "listener.max_connections: empty value is not an integer >= 1",
        )

    def test_integerRange(self) -> None:
        self.assertRefused(
            {"listener": {"max_identity_length": 256}},
            "listener.max_identity_length: 256 is not an integer from 1 to 255",
        )
        self.assertRefused(
            {"websocket": {"ws_opts.max_frame_size": 1023}},
            "websocket.ws_opts.max_frame_size: 1023 is not an integer >= 1024",
        )
        self.assertRefused(
            {"queue": {"x-message-ttl": 2**32}},
            "queue.x-message-ttl: 4294967296 is not an integer from 0 to 4294967295",
        )

    def test_negativeTimeout(self) -> None:
        self.assertParseRefused(
            "[ocpp]\ncall_timeout = -5\n",
            "ocpp.call_timeout: -5 is not a number of seconds > 0",
        )
        self.assertParseRefused(
            "[websocket]\nws_opts.idle_timeout = -1\n",
            "websocket.ws_opts.idle_timeout: -1 is not a number of seconds >= 0",
        )

    def test_zeroTimeout(self) -> None:
        """Zero is only allowed where it means something ("no pings")."""
        self.assertParseRefused(
            "[websocket]\nping_timeout = 0\n",
            "websocket.ping_timeout: 0 is not a number of seconds > 0",
        )

    def test_notANumberOfSeconds(self) -> None:
        for text in ["soon", "inf", "nan", "1e3", "30s"]:
            self.assertParseRefused(
                f"[amqp]\nconnect_timeout = {text}\n",
                f"amqp.connect_timeout: {text} is not a number of seconds > 0",
            )
        self.assertRefused(
            {"amqp": {"connect_timeout": float("inf")}},
            "amqp.connect_timeout: inf is not a number of seconds > 0",
        )

    def test_badBoolean(self) -> None:
        self.assertParseRefused(
            "[ocpp]\npresence_events = maybe\n",
            "ocpp.presence_events: maybe is not a boolean (true/false, yes/no, on/off, 1/0)",
        )

    def test_unknownSubprotocol(self) -> None:
        self.assertParseRefused(
            "[listener]\nsubprotocols = ocpp1.6, ocpp3.0\n",
            "listener.subprotocols: ocpp3.0 is not an OCPP-J subprotocol "
            "(ocpp1.6, ocpp2.0, ocpp2.0.1, ocpp2.1)",
        )

    def test_soapSubprotocol(self) -> None:
        for name in ["ocpp1.2", "ocpp1.5"]:
            self.assertParseRefused(
                f"[listener]\nsubprotocols = ocpp1.6 {name}\n",
                f"listener.subprotocols: {name} is SOAP-only, not OCPP-J",
            )

    def test_noSubprotocol(self) -> None:
        self.assertParseRefused(
            "[listener]\nsubprotocols = ,\n",
            "listener.subprotocols: , is not a list of ocpp1.6, ocpp2.0, ocpp2.0.1, ocpp2.1",
        )
        self.assertRefused(
            {"listener": {"subprotocols": ()}},
            "listener.subprotocols: () is not a list of ocpp1.6, ocpp2.0, ocpp2.0.1, ocpp2.1",
        )

    def test_duplicateSubprotocol(self) -> None:
        self.assertParseRefused(
            "[listener]\nsubprotocols = ocpp2.1 ocpp2.1\n",
            "listener.subprotocols: ocpp2.1 is listed twice",
        )

    def test_defaultSubprotocolMustBeEnabled(self) -> None:
        """
        The version a charger without a subprotocol is served as must be
        one the listener offers, on either listener.
        """
        self.assertParseRefused(
            "[listener]\nsubprotocols = ocpp2.0.1\ndefault_subprotocol = ocpp1.6\n"
            "ssl.default_subprotocol = ocpp2.1\n",
            "listener.default_subprotocol: ocpp1.6 is not one of listener.subprotocols",
            "listener.ssl.default_subprotocol: ocpp2.1 is not one of listener.subprotocols",
        )
        self.assertParseRefused(
            "[listener]\ndefault_subprotocol = OCPP1.6\n",
            "listener.default_subprotocol: OCPP1.6 is not empty or one of ocpp1.6, ocpp2.0, "
            "ocpp2.0.1, ocpp2.1",
        )

    def test_legacyTlsNeedsOldSuites(self) -> None:
        """
        TLS 1.0/1.1 with the default (TLS 1.2-only) suites would change
        nothing: refused, naming what to set.
        """
        self.assertParseRefused(
            "[listener]\nssl.min_version = TLSv1\n",
            "listener.ssl.ciphers: the default suites need TLS 1.2, so ssl.min_version = "
            "TLSv1 would change nothing; name suites that old chargers have (for example "
            "DEFAULT, or ECDHE-RSA-AES128-SHA:AES128-SHA)",
        )
        settings = config.parse("[listener]\nssl.min_version = TLSv1.1\nssl.ciphers = DEFAULT\n")
        self.assertEqual(settings.listener.ssl_min_version, "TLSv1.1")
        self.assertParseRefused(
            "[listener]\nssl.min_version = SSLv3\n",
            "listener.ssl.min_version: SSLv3 is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3",
        )

    def test_badCiphers(self) -> None:
        for text in ["", "AES128-SHA\tRC4", "AES\u00e9"]:
            self.assertRefused(
                {"listener": {"ssl.ciphers": text}},
                f"listener.ssl.ciphers: {config._show(text.strip())} is not an OpenSSL cipher "
                "list such as ECDHE-RSA-AES128-GCM-SHA256:DEFAULT",
            )

    def test_messageIdLength(self) -> None:
        """From the specs' 36 up to the 255 of an AMQP short string."""
        for value in ("35", "256"):
            self.assertParseRefused(
                f"[ocpp]\nmax_message_id_length = {value}\n",
                f"ocpp.max_message_id_length: {value} is not an integer from 36 to 255",
            )

    def test_badHost(self) -> None:
        for host in ["10.0.0.300", "[::1]", "-gw", "a b", "gw_1"]:
            self.assertRefused(
                {"listener": {"tcp.ip": host}},
                f"listener.tcp.ip: {host} is not an IP address (IPv6 without brackets) "
                "or a host name",
            )

    def test_badPath(self) -> None:
        for path, reason in [
            ("ocpp", "ocpp does not start with '/'"),
            ("/ocpp/", "/ocpp/ ends with '/'"),
            ("/", "/ ends with '/'"),
            ("/a//b", "/a//b has an empty segment ('//')"),
            (
                "/o.cpp",
                "/o.cpp contains '.'; a path segment may hold letters, digits "
                "and - _ ~ ! $ & ' ( ) * + , ; = : @",
            ),
            (
                "/oc%70p",
                "/oc%70p contains '%'; a path segment may hold letters, digits "
                "and - _ ~ ! $ & ' ( ) * + , ; = : @",
            ),
            (
                "/oc#pp",
                "/oc#pp contains '#'; a path segment may hold letters, digits "
                "and - _ ~ ! $ & ' ( ) * + , ; = : @",
            ),
        ]:
            self.assertRefused(
                {"listener": {"ws_path": path}}, f"listener.ws_path: {reason}"
            )

    def test_badVhost(self) -> None:
        self.assertRefused(
            {"listener": {"vhost": "a\nb"}},
            "listener.vhost: 'a\\nb' is not printable text of at most 255 characters",
        )

    def test_badExchange(self) -> None:
        self.assertRefused(
            {"amqp": {"exchange": "amq.topic"}},
            "amqp.exchange: amq.topic is reserved by RabbitMQ (amq.*)",
        )
        for name in ["", "my exchange", "ocpp/x"]:
            shown = name or "empty value"
            self.assertRefused(
                {"amqp": {"exchange": name}},
                f"amqp.exchange: {shown} is not an exchange name (letters, digits, - _ . :)",
            )

    def test_deadLetterExchangeMayBeReserved(self) -> None:
        """Only declared exchanges must avoid C{amq.*}; publishing to them is fine."""
        settings = config.settings_from_dict(
            {"queue": {"x-dead-letter-exchange": "amq.topic"}}
        )
        self.assertEqual(settings.queue.x_dead_letter_exchange, "amq.topic")

    def test_badQueueType(self) -> None:
        self.assertRefused(
            {"queue": {"x-queue-type": "stream"}},
            "queue.x-queue-type: stream is not one of classic, quorum",
        )

    def test_badQueueVersion(self) -> None:
        self.assertRefused(
            {"queue": {"x-queue-version": "3"}},
            "queue.x-queue-version: 3 is not an integer from 0 to 2",
        )

    def test_badQueueMode(self) -> None:
        self.assertRefused(
            {"queue": {"x-queue-mode": "Lazy"}},
            "queue.x-queue-mode: Lazy is not one of empty, default, lazy",
        )

    def test_classicArgumentsOfQuorumQueues(self) -> None:
        """
        RabbitMQ refuses C{x-queue-version} and C{x-queue-mode} for quorum
        queues (PRECONDITION_FAILED on every charger's declare): refused at
        start instead, each naming its key.
        """
        error = self.assertRaises(
            ConfigError, config.settings_from_dict,
            {"queue": {"x-queue-type": "quorum", "x-queue-version": "2", "x-queue-mode": "lazy"}},
        )
        self.assertEqual(error.problems, (
            "queue.x-queue-version: applies to classic queues only, not to "
            "x-queue-type = quorum (leave it empty or 0)",
            "queue.x-queue-mode: applies to classic queues only, not to "
            "x-queue-type = quorum (leave it empty or 0)",
        ))

    def test_badUrl(self) -> None:
        for url, reason in [
            ("http://h/", "http://h/ is not an amqp:// or amqps:// URL"),
            ("amqp:///%2F", "amqp:///%2F names no host"),
            ("amqp://h:99999/", "amqp://h:99999/ is not a valid URL"),
            ("amqp://h:0/", "amqp://h:0/ has port 0"),
        ]:
            self.assertRefused({"amqp": {"url": url}}, f"amqp.url: {reason}")

    def test_passwordMasked(self) -> None:
        """The broker password never appears in an error."""
        for url, shown in [
            ("http://gw:s3cret@h/", "http://gw:****@h/"),
            ("amqp://gw:s3cret@h:99999/", "amqp://gw:****@h:99999/"),
            ("amqp:gw:s3cret@h/", "****@h/"),
        ]:
            error = self.assertRaises(
                ConfigError, config.parse, f"[amqp]\nurl = {url}\n"
            )
            self.assertNotIn("s3cret", str(error))
            self.assertIn(shown, str(error))
        self.assertRefused(
            {"amqp": {"url": b"amqp://gw:s3cret@h/"}},
            "amqp.url: a bytes is not an amqp:// or amqps:// URL",
        )

    def test_everyProblemReported(self) -> None:
        """All problems are reported at once, unknown sections first."""
        self.assertParseRefused(
            "[listener]\ntcp.port = x\nbogus = 1\n[amqp]\nheartbeat = -1\n[nope]\n",
            "nope: unknown section",
            "listener.bogus: unknown key",
            "listener.tcp.port: x is not a port (1-65535, or 0 for any free port)",
            "amqp.heartbeat: -1 is not an integer from 0 to 65535",
        )

    def test_messageIsOneProblemPerLine(self) -> None:
        error = self.assertRaises(
            ConfigError, config.parse, "[listener]\ntcp.port = x\nbogus = 1\n"
        )
        self.assertEqual(str(error), "\n".join(error.problems))
        self.assertIsInstance(error, ValueError)

    def test_longValueTruncated(self) -> None:
        """A long bad value is shortened in the error."""
        error = self.assertRaises(
            ConfigError,
            config.settings_from_dict,
            {"queue": {"x-queue-type": "q" * 500}},
        )
        self.assertEqual(
            error.problems,
            (f"queue.x-queue-type: {'q' * 57}... is not one of classic, quorum",),
        )


class ValidationSectionTests(ParseErrorMixin, SynchronousTestCase):
    """The [validation] keys: modes, lists, the schema directory."""

    def test_modes(self) -> None:
        for mode in ("off", "warn", "enforce"):
            settings = config.settings_from_dict({"validation": {"mode": mode}})
            self.assertEqual(settings.validation.mode, mode)
        self.assertRefused(
            {"validation": {"mode": "strict"}},
            "validation.mode: strict is not one of off, warn, enforce",
        )

    def test_exemptActions(self) -> None:
        settings = config.settings_from_dict(
            {"validation": {"exempt_actions": "DataTransfer DataTransfer,Heartbeat"}}
        )
        self.assertEqual(settings.validation.exempt_actions, ("DataTransfer", "Heartbeat"))
        self.assertRefused(
            {"validation": {"exempt_actions": "Data.Transfer"}},
            "validation.exempt_actions: Data.Transfer is not an OCPP action name",
        )

    def test_exemptIdentities(self) -> None:
        settings = config.settings_from_dict(
            {"validation": {"exempt_identities": ["DE*ABC*", "CP?1"]}}
        )
        self.assertEqual(settings.validation.exempt_identities, ("DE*ABC*", "CP?1"))
        self.assertRefused(
            {"validation": {"exempt_identities": "CP[12]"}},
            "validation.exempt_identities: CP[12] is not an identity pattern",
        )

    def test_schemaDirMustExist(self) -> None:
        missing = "/nonexistent/ocppgw-schemas"
        self.assertRefused(
            {"validation": {"schema_dir": missing}},
            f"validation.schema_dir: {missing} is not an existing directory",
        )


class SyntaxTests(ParseErrorMixin, SynchronousTestCase):
    """INI syntax errors name the place, never the offending line's text."""

    def test_duplicateKey(self) -> None:
        self.assertParseRefused(
            "[listener]\ntcp.port = 1\ntcp.port = 2\n",
            "listener.tcp.port: duplicate key (line 3)",
        )

    def test_duplicateSection(self) -> None:
        self.assertParseRefused("[ocpp]\n[ocpp]\n", "ocpp: duplicate section (line 2)")

    def test_keyBeforeSection(self) -> None:
        self.assertParseRefused(
            "tcp.port = 1\n", "<string>:1: a key before the first [section]"
        )

    def test_notKeyValue(self) -> None:
        """A line without C{=} is refused; C{:} is no delimiter."""
        self.assertParseRefused(
            "[amqp]\nurl: amqp://u:s3cret@h/\nnode\n",
            "<string>:2: not a 'key = value' line",
            "<string>:3: not a 'key = value' line",
        )


class LoadTests(SynchronousTestCase):
    """L{config.load} reads a file."""

    def test_load(self) -> None:
        path = Path(self.mktemp())
        path.write_text("[listener]\ntcp.port = 0\n", encoding="utf-8")
        self.assertEqual(config.load(str(path)).listener.tcp_port, 0)
        self.assertEqual(config.load(path).listener.tcp_port, 0)

    def test_byteOrderMark(self) -> None:
        """A file saved with a UTF-8 BOM (Windows editors) is read."""
        path = Path(self.mktemp())
        path.write_bytes(b"\xef\xbb\xbf[listener]\ntcp.port = 0\n")
        self.assertEqual(config.load(path).listener.tcp_port, 0)

    def test_unreadableFile(self) -> None:
        path = self.mktemp()
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(
            error.problems, (f"{path}: cannot read: No such file or directory",)
        )

    def test_directory(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(error.problems, (f"{path}: cannot read: Is a directory",))

    def test_notUtf8(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"[amqp]\nnode = \xff\n")
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(error.problems, (f"{path}: cannot read: not UTF-8 (byte 14)",))

    def test_syntaxErrorNamesFile(self) -> None:
        path = Path(self.mktemp())
        path.write_text("tcp.port = 1\n", encoding="utf-8")
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(
            error.problems, (f"{path}:1: a key before the first [section]",)
        )


class MaskUrlTests(SynchronousTestCase):
    """L{config.mask_url} hides passwords, also in mangled URLs."""

    def test_mask(self) -> None:
        for url, masked in [
            ("amqp://guest:guest@h:5672/%2F", "amqp://guest:****@h:5672/%2F"),
            ("amqp://guest@h/", "amqp://guest@h/"),
            ("amqp://h/", "amqp://h/"),
            ("amqp://u:p@ss/w@rd@h/v", "amqp://u:****@h/v"),
            ("amqp:u:secret@h", "****@h"),
        ]:
            self.assertEqual(config.mask_url(url), masked)


class GeneratedDocsTests(SynchronousTestCase):
    """
    The shipped INI file and the documentation's reference tables come from
    the option table.
    """

    def test_shippedIniIsGenerated(self) -> None:
        """
        C{etc/ocppgw.ini} equals C{python -m ocppgw.config --ini}; after
        changing the table, regenerate it with that command.
        """
        shipped = (ROOT / "etc" / "ocppgw.ini").read_text(encoding="utf-8")
        self.assertEqual(shipped, config.render_ini())

    def test_docsHaveTheReferenceTable(self) -> None:
        """
        The configuration page of the documentation is the generated table:
        docs/_ext/optiontable.py puts C{python -m ocppgw.config --markdown}
        in place of the page's marker line when the site is built
        (tests/test_docs.py builds it).
        """
        from tests.test_docs import option_table_extension

        page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
        built = option_table_extension().with_tables(page)
        self.assertIn(config.render_markdown().strip(), built)

    def test_shippedIniIsDefaults(self) -> None:
        self.assertEqual(config.load(ROOT / "etc" / "ocppgw.ini"), config.defaults())

    def test_iniDocumentsEveryKey(self) -> None:
        ini = config.render_ini()
        for section in config.SECTIONS:
            self.assertIn(f"\n[{section.name}]\n", ini)
            for option in section.options:
                self.assertIn(
                    f"\n#{option.key} = {option.default}".rstrip() + "\n", ini
                )

    def test_uncommentedIniIsDefaults(self) -> None:
        """Uncommenting every key of the generated file changes nothing."""
        lines = [
            line[1:] if re.match("#[a-z]", line) else line
            for line in config.render_ini().splitlines()
        ]
        settings = config.parse("\n".join(lines))
        self.assertEqual(settings, config.defaults())

    def test_markdownDocumentsEveryKey(self) -> None:
        markdown = config.render_markdown()
        for section in config.SECTIONS:
            self.assertIn(f"### `[{section.name}]`", markdown)
            for option in section.options:
                self.assertIn(f"| `{option.key}` |", markdown)

    def test_markdownEscapes(self) -> None:
        """C{<identity>} would vanish as an HTML tag; C{|} would split a cell."""
        markdown = config.render_markdown()
        self.assertIn("\\<ws_path>/\\<identity>", markdown)
        self.assertNotIn(" <", markdown)


class MainTests(SynchronousTestCase):
    """C{python -m ocppgw.config}."""

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = config.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_ini(self) -> None:
        self.assertEqual(self.run_main("--ini"), (0, config.render_ini(), ""))

    def test_markdown(self) -> None:
        self.assertEqual(self.run_main("--markdown"), (0, config.render_markdown(), ""))

    def test_noCheck(self) -> None:
        """
        Checking a file is C{ocppgw check-config}'s job alone (one checker,
        documented once): this module only prints the reference.
        """
        error = self.assertRaises(SystemExit, self.run_main, "--check", "etc/ocppgw.ini")
        self.assertEqual(error.code, 2)


class ImportTests(SynchronousTestCase):
    """The config module stays usable without networking libraries."""

    def test_noNetworkImports(self) -> None:
        """
        C{ocppgw.config} imports nothing from C{twisted.internet}, autobahn
        or pika (read from its source: trial itself has imported them all).
        """
        tree = ast.parse((ROOT / "ocppgw" / "config.py").read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
        forbidden = {
            name
            for name in imported
            if name.split(".")[0] in ("autobahn", "pika")
            or name.startswith("twisted.internet")
            or name == "twisted"
        }
        self.assertEqual(forbidden, set())


class OperationsSettingsTests(SynchronousTestCase):
    """[admin], [log] and [audit]."""

    def test_adminCredentialsComeTogether(self) -> None:
        for text in ("[admin]\nusername = ops\n", "[admin]\npassword = x\n"):
            error = self.assertRaises(ConfigError, config.parse, text)
            self.assertEqual(
                error.problems,
                ("admin.password: username and password are set together (both or neither)",),
            )

    def test_adminPasswordNotInRepr(self) -> None:
        settings = config.parse("[admin]\nusername = ops\npassword = hunter2\n")
        self.assertEqual(settings.admin.password, "hunter2")
        self.assertNotIn("hunter2", repr(settings))

    def test_badLogFormat(self) -> None:
        error = self.assertRaises(ConfigError, config.parse, "[log]\nformat = xml\n")
        self.assertEqual(error.problems, ("log.format: xml is not one of text, json",))

    def test_auditExchangeNotReserved(self) -> None:
        error = self.assertRaises(ConfigError, config.parse, "[audit]\nexchange = amq.x\n")
        self.assertEqual(
            error.problems, ("audit.exchange: amq.x is reserved by RabbitMQ (amq.*)",)
        )
