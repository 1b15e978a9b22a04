"""Event buses: the outbox relay hands committed events to sinks in outbox order.

`postgres` is the embedded default (the relay runs the consumers in the worker); `kafka`
(`BILLFOLD_KAFKA_BOOTSTRAP` set) publishes to topics per service and runs each consumer in a
consumer group of its own; `replay` re-delivers published events on either. Consumers
(`consumers.Consumer`) are the same on both: each event's effect and inbox row commit together.
"""
