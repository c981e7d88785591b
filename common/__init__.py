"""Serving boilerplate written once: config from flags and environment, gRPC server start-up, logging, models."""
