# The maker lives in ocppgw.tap, where `ocppgw run` uses it without
# Twisted's plugin discovery; importing it loads the option parser and the
# configuration table, not the gateway (that happens in makeService).
from ocppgw.tap import serviceMaker as ocppgw

__all__ = ["ocppgw"]
