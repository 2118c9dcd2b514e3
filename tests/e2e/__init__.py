"""End-to-end tests: a real Prefect server, worker, deployments and UI (docs/server.md, "Testing it")."""
