"""Router: the global KV index, routing policies and the pure Router the server and the
simulator share (no I/O here; the server's I/O lives in kvgrid.server.links)."""
