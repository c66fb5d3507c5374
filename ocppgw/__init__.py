"""
ocppgw: an OCPP-J gateway between charge stations and RabbitMQ.

Embed it in a Twisted application with L{makeService}::

    from ocppgw import makeService
    makeService("etc/ocppgw.ini", reactor).setServiceParent(application)
"""

from ocppgw.version import VERSION as __version__


def makeService(config=None, reactor=None, **kwargs):
    """
    Build the gateway's service tree; see L{ocppgw.service.makeService}.
    """
    from ocppgw.service import makeService as _makeService

    return _makeService(config, reactor, **kwargs)


__all__ = ["makeService", "__version__"]
