"""The HTTP side: the listener, the middlewares in their order, the ingest handler, the
other routes and every answer (problems included).

Owns: how a request is read, admitted, authenticated, limited, parsed and answered.
Knows the sink only as `gateway.sink.Sink`; what a record becomes in Kafka is not here.

May import: gateway.limits, gateway.keys and the base modules.
"""
