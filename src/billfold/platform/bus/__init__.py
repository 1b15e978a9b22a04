"""Event buses: the outbox relay hands committed events to sinks in outbox order."""
