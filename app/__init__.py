"""The application shell: the `genserve` command's dispatch and the quickstart, which may use every station."""
