"""The spool: records kept on local disk while Kafka cannot take them, sent in order
once it can. `SpoolingSink` wraps another sink; `file` is the on-disk format.

May import: the base modules only (the sink it wraps is any `gateway.sink.Sink`).
"""
