"""The Kafka sink: everything in the gateway that knows aiokafka or librdkafka.

Owns: the producers and their renewal (sink), one partition's record batches (batcher),
the same sink on librdkafka for CAFE_KAFKA_CLIENT=librdkafka (rdkafka), the partitioner,
the topics (looked for, created, checked), and the connection's TLS and SASL with the
words for a refused one (auth).

May import: the base modules only.
"""
