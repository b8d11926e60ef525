"""Torch-free pieces shared by every station: the data spec and the seeded noise streams."""
