"""
ocppgw's version, in a module of its own so that the modules reporting it
(metrics, the status page) need not import the package's entry points.
"""

#: The release, as in the package metadata (setup.cfg reads it from here).
VERSION = "0.1.0"
