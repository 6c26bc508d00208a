"""Operations plumbing shared by every process: logging set-up and Prometheus metrics. Imports only config."""
