"""A federated run without Flower: settings, the server's round step and state, the client's round, the run folder."""
