"""
Fault tests: broker failures, flow control, storms, several gateways and
drain, against real brokers and real sockets.

Tests that stop a broker or set an alarm on it use a throw-away RabbitMQ
node of their own (L{tests.faults.broker.ThrowAwayBroker}), tests that
kill nodes hard a cluster of their own (L{tests.faults.cluster}): the
shared broker on 127.0.0.1:5672 serves other test runs at the same time
and is never stopped, restarted, alarmed or joined here.

Tests that need the AMQP connection to die at a precise moment (a publish
awaiting its confirm, a declare, an ack, a reconnect) put a
L{tests.faults.proxy.FaultProxy} between the gateway and the broker.
"""
