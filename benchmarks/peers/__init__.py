"""genserve against its peers (MLServer, KServe, Triton via PyTriton) on the same graph: ``python -m benchmarks.peers``.

graph.py picks and writes the graph, launch.py installs and starts the peers in their own virtualenvs
(runtimes/ holds the code that runs inside them), oipload.py is the one OIP gRPC closed-loop client that
drives every server, treecpu.py reads the CPU of each server's process tree, summary.py makes the table.
"""
