"""`expertmesh serve`: an OpenAI-compatible HTTP server over the serving engine (rank 0), and
`expertmesh bench serve`, the client side of a load test."""
