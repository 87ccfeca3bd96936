"""The node's worker: claims sessions, runs their sandboxes, relays stdio."""
