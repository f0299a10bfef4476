"""cafe-gateway: validates CAFe API records and produces them to Kafka."""
