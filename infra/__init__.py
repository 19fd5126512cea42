"""The local stack: Maven pom for the Java parts, configuration templates and the launcher."""
