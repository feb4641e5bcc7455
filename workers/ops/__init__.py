"""What ops see: a snapshot of queues, workers and outcomes, as a table, JSON, metrics or a page."""
