"""lbtcp: a pure TCP (layer-4) load balancer on asyncio and uvloop."""

__version__ = "0.1.0"
