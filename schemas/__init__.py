"""The project's own Avro schemas, and the codec that decodes registry-framed Avro (fastavro, schemas cached by id)."""
