"""The HTTP side: the listener, the middlewares in their order, the ingest handler, the
other routes and every answer (problems included).

Owns: how a request is read, admitted, authenticated, limited, parsed and answered.
Knows the sink only as `gateway.sink.Sink`, and gives it records with their request's
`Context`; what a record becomes in Kafka (key, headers, a dead letter cut to size) is
`gateway.kafka.messages`, not here.

May import: gateway.limits, gateway.keys and the base modules.
"""
