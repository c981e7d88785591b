"""OpenAI's HTTP API: request.py reads it, reply.py writes it, server.py serves it."""
