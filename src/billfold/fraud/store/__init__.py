"""The fraud schema's SQL: decisions and cases here; rules and lists in `store.rules`."""
