"""`expertmesh serve`: an OpenAI-compatible HTTP server over the serving engine (API server
processes joined to the engine's rank 0 by one IPC channel), and `expertmesh bench serve`, the
client side of a load test."""
