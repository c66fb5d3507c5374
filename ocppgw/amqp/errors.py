"""
What the AMQP layer raises to the rest of ocppgw.
"""


class BrokerUnavailable(Exception):
    """
    The broker connection is not up, so the request cannot be served.
    """


class DeclareFailed(Exception):
    """
    The broker refused to declare or bind a charger queue.
    """


class ChannelGone(Exception):
    """
    The channel carrying an operation closed before it completed.
    """
