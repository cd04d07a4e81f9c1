"""The admin HTTP API: the server (h11 over an asyncio Protocol), its routes, the /status
document and the live status page."""
