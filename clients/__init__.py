"""Clients: the friendly Python client (sync and asyncio), its channel settings and the client subcommands."""
