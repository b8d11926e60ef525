"""Clients: generated stubs, the friendly Python client and the `genserve` command line."""
