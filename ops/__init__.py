"""Running actorq: the CLI, the embedded local stack, Flower, benchmarks, deployment files."""
