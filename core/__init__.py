"""Torch-free pieces shared by every station: data spec, seeded noise and seeds, manifest I/O, CLI error guard."""
