"""Server: the OpenAI-compatible frontend, worker processes, tenants and metrics."""
