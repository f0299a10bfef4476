"""The HTTP side: the listener, the middlewares in their order, the ingest handler, the
other routes and every answer (problems included).

Owns: how a request is read, admitted, authenticated, limited, parsed and answered.
Knows the sink only as `gateway.sink.Sink`, but still frames each record as the sink's
`Message` (its key, value and headers, dead letters cut to size), which is Kafka's shape:
that framing is to move into the Kafka sink.

May import: gateway.limits, gateway.keys and the base modules.
"""
