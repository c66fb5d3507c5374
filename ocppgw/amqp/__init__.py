"""
ocppgw's AMQP layer: the only package that speaks to pika.

pika's Twisted adapter is deprecated upstream (pika is pinned below 2), so
everything pika-specific stays behind this package's small surface:

- L{bridge}: the gateway's side -- the shared connection and what each
  connection is set up with (L{AmqpBridge}), made of
  L{publishing} (publishes with confirms, flow control),
  L{queues} (charger queues and their consumers),
  L{exchanges} (our exchanges, the sentinel, finding them deleted) and
  L{control} (the control exchange between gateway processes);
- L{link}: the broker link's state machine -- which connection is
  current, loss, reconnection with back-off (L{BrokerLink});
- L{connection}: one AMQP connection and the guard that keeps anything
  from being sent on it once it is lost, and pika's callbacks from
  raising into pika (L{BrokerConnection});
- L{channels}: the roles of those channels (confirm, declare, consumer)
  and a charger's L{Consumer};
- L{errors}: what this package raises;
- L{wire}: the two hottest AMQP methods (publish, ack) encoded directly;
- L{reader}: the two hottest incoming ones (deliveries, confirms) read
  directly, everything else left to pika;
- L{client}: the CSMS side of the contract for the command line, the
  examples, the C{amqp} credentials checker and the tests
  (L{BackEndClient}, L{check_login}).
"""

from ocppgw.amqp.bridge import AmqpBridge
from ocppgw.amqp.link import BrokerLink, InvalidTransition, LinkState
from ocppgw.amqp.channels import Consumer
from ocppgw.amqp.errors import BrokerUnavailable, ChannelGone, DeclareFailed
from ocppgw.amqp.client import DIRECT_REPLY_TO, BackEndClient, Message, check_login
from ocppgw.amqp.wire import FixedHeaders

__all__ = [
    "AmqpBridge",
    "BackEndClient",
    "BrokerLink",
    "BrokerUnavailable",
    "ChannelGone",
    "Consumer",
    "DIRECT_REPLY_TO",
    "DeclareFailed",
    "FixedHeaders",
    "InvalidTransition",
    "LinkState",
    "Message",
    "check_login",
]
