"""The `moegrow` CLI, benchmarks and corpus preparation."""
