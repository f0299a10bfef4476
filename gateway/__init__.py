"""cafe-gateway: CAFe API records over HTTP, checked, into Kafka.

The packages, from the top down. Each may import only those below it, and the base
imports no package (tests/test_architecture.py holds this, and that no modules import
each other in a cycle):

    app, server, workers, cli   the process: wiring (`create_app`), serving, commands
    http/     the HTTP side: listener, middlewares, the ingest handler, answers
    spool/    records kept on disk while Kafka is away: a Sink around another Sink
    kafka/    the Kafka sink: producers, batches, partitions, topics, TLS and SASL
    limits/   rate limits: this host's shared buckets, the fleet's in Redis
    keys/     API keys: the model, the keys file, the in-memory store
    base      config, errors, metrics, logs, schemas, sink (the Sink protocol)

May import: everything (this is the top); the packages are listed above.
"""
