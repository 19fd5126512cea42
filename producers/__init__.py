"""Capture: the Kafka Connect REST client, the Debezium configuration we generate, and topic administration."""
