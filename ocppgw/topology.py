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


def control_exchange(exchange: str) -> str:
    """
    The fanout exchange gateway processes tell each other things on
    (takeovers, who is there), beside the OCPP exchange C{exchange}.

    It is apart from the OCPP exchange so that no back-end binding (C{#})
    ever sees these messages.
    """
    return exchange + ".gateways"


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
