"""
The names ocppgw uses in RabbitMQ: the one place that spells them.

Back-end workers in any language depend on these strings (see
docs/amqp-contract.md), so they are defined once here and nowhere else:

- every charger frame goes to the OCPP exchange with routing key
  ``<version>.<Action>.<kind>`` (``ocpp16.BootNotification.req``);
- an answer from the charger whose CALL is unknown (timed out, or sent by
  another gateway process) is routed with the action ``response``;
- each charger has a durable queue ``ocpp.<identity>`` bound with the
  binding key ``<identity>``, which is how the back end addresses it;
- presence events use ``ocppgw.connected`` and ``ocppgw.disconnected``;
  they cannot collide with a charger's binding key because an identity never
  contains a ``.``.
"""

from __future__ import annotations

#: Kind word of a charger's CALL and SEND.
KIND_REQUEST = "req"
#: Kind word of a charger's CALLRESULT.
KIND_CONFIRMATION = "conf"
#: Kind word of a charger's CALLERROR and CALLRESULTERROR.
KIND_ERROR = "error"

#: Action word used when the CALL an answer belongs to is not known.
UNKNOWN_ACTION = "response"

QUEUE_PREFIX = "ocpp."

ROUTING_KEY_CONNECTED = "ocppgw.connected"
ROUTING_KEY_DISCONNECTED = "ocppgw.disconnected"

#: Header names set on every message ocppgw publishes for a charger.
HEADER_IDENTITY = "x-ocpp-identity"
HEADER_VERSION = "x-ocpp-version"
HEADER_NODE = "x-ocppgw-node"
#: Set (to ``true``) on the CALLERROR ocppgw publishes when a charger did
#: not answer a CSMS CALL in time, so workers can tell it from a real one.
HEADER_TIMEOUT = "x-ocppgw-timeout"
#: Set on the offline StatusNotification, which the gateway makes up.
HEADER_SYNTHETIC = "x-ocppgw-synthetic"
#: Set on a charger's answer to a CSMS CALL that breaks OCPP-J (error
#: details that are not an object, extra elements, an error code its
#: version does not define): the body is the charger's text as it came,
#: published as that CALL's answer all the same; the value says what is
#: wrong with it.
HEADER_MALFORMED = "x-ocppgw-malformed"

#: Set on a frame whose payload breaks its OCPP JSON schema (validation
#: mode ``warn``), on the CALLERROR the gateway publishes in place of an
#: invalid CALLRESULT (``enforce``), and on a back-end command the gateway
#: refused to send: what is wrong, naming the field.
HEADER_VALIDATION_ERROR = "x-ocppgw-validation-error"
#: With it: the OCPP error code for it, spelled for the charger's version.
HEADER_VALIDATION_CODE = "x-ocppgw-validation-code"

#: ``app_id`` property of everything ocppgw publishes.
APP_ID = "ocppgw"

#: The default exchange, which routes by queue name: replies to a
#: command's ``reply_to`` (also RabbitMQ's direct reply-to) go there.
DEFAULT_EXCHANGE = ""

#: RabbitMQ's direct reply-to pseudo-queue: a back end that sets it as a
#: command's ``reply_to`` gets the charger's answer on its own channel.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

#: ``message_id`` prefix of the offline StatusNotification the gateway
#: publishes for a charger that went away (followed by random hex).
OFFLINE_MESSAGE_ID_PREFIX = "ocppgw-offline-"

#: Routing key of the sentinel's binding into the OCPP exchange (nothing
#: is published to the sentinel, so it only has to be a valid key).
SENTINEL_ROUTING_KEY = "sentinel"

#: The audit trail (see L{ocppgw.audit}): the header naming the direction
#: of an audited frame, and its values, which are also the last word of
#: the audit routing key ``<identity>.<direction>``.
AUDIT_HEADER_DIRECTION = "x-ocppgw-direction"
#: Header with the time the gateway saw an audited frame (ms since the epoch).
AUDIT_HEADER_TIME = "x-ocppgw-time"
AUDIT_IN = "in"
AUDIT_OUT = "out"
AUDIT_EVENT = "event"

#: ``product`` of every AMQP connection ocppgw opens (client properties,
#: shown in the broker's management UI).
PRODUCT = "ocppgw"


def charger_queue(identity: str) -> str:
    """
    The name of the durable queue that holds commands for C{identity}.
    """
    return QUEUE_PREFIX + identity


def charger_binding_key(identity: str) -> str:
    """
    The binding key (and the routing key the back end uses) of a charger.

    The identity is validated to contain no ``.``, so this is one word and,
    because ``*`` and ``#`` alone are refused, never a wildcard.
    """
    return identity


def routing_key(routing_prefix: str, action: str, kind: str) -> str:
    """
    Routing key of a charger frame: ``<version>.<Action>.<kind>``.

    The framing admits only letters and digits in an action, so the
    charger-chosen part is one topic word: it cannot add words that would
    impersonate another version or kind.
    """
    return f"{routing_prefix}.{action}.{kind}"


def audit_routing_key(identity: str, direction: str) -> str:
    """
    C{<identity>.<in|out|event>}: the audit trail's routing key. The
    identity is one topic word, so C{<identity>.#} selects one charger.
    """
    return f"{identity}.{direction}"


def client_properties(connection_name: str) -> dict:
    """
    The AMQP client properties of a connection called C{connection_name}
    (the broker shows both in its management UI).
    """
    return {"connection_name": connection_name, "product": PRODUCT}


def gateway_connection_name(node: str) -> str:
    """The name of gateway process C{node}'s broker connection."""
    return f"ocppgw {node}"


#: The name of the short connection that checks a charger's credentials
#: against the broker (the C{amqp} credentials checker).
LOGIN_CHECK_CONNECTION_NAME = "ocppgw login check"


def consumer_tag_prefix(channel_number: int, token: str) -> str:
    """
    The start of the consumer tags on one consumer channel: unique on the
    channel, and telling in the broker's management UI whose consumer it
    is; a counter follows it.
    """
    return f"ocppgw.{channel_number}.{token}."


def control_exchange(exchange: str) -> str:
    """
    The fanout exchange gateway processes tell each other things on
    (takeovers, who is there), beside the OCPP exchange C{exchange}.

    It is apart from the OCPP exchange so that no back-end binding (C{#})
    ever sees these messages.
    """
    return exchange + ".gateways"


#: The C{type} of a control message telling the other gateway processes
#: that this one took a charger over (they close their connection of it,
#: if theirs is older). Its other keys: C{identity}, C{node} (the sender's)
#: and C{claimed}, the sender's clock time of the claim.
CONTROL_TAKEOVER = "takeover"


def sentinel_exchange(exchange: str, token: str) -> str:
    """
    A gateway connection's sentinel for the OCPP exchange C{exchange}.

    The sentinel is an auto-delete exchange whose only binding leads
    I{into} the OCPP exchange. RabbitMQ removes a binding when either end
    is deleted, and an auto-delete exchange with it: so the sentinel
    exists exactly as long as the OCPP exchange it was bound to, even if
    an operator deletes that exchange and declares it again (which drops
    every charger queue's binding). Nothing is ever published to it.
    """
    return f"{exchange}.gateways.sentinel.{token}"
