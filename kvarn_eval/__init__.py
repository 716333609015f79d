"""KVarN evaluation: real assets, baselines, quality reports, benchmarks and the `kvarn` CLI."""
