"""The scheduler: HTTP API, admission control and the stdio gateway."""
