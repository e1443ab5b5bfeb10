"""Fine-tuning and batch jobs: rows in the store, run one at a time (jobs.concurrency) by a worker as
`forja` processes, so the server's event loop and memory are untouched."""
