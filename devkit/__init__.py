"""Tools shared by the tests and the benchmarks; not part of the gateway, not shipped."""
