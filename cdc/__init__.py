"""cdc: an event-sourced change-data-capture pipeline (Debezium on Kafka Connect into SQLAlchemy destinations)."""

__version__ = "0.1.0"
