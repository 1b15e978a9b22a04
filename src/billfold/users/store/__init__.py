"""SQL for the `users` schema, one module per aggregate; nothing else writes these tables."""
