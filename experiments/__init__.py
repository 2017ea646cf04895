"""The command-line programs of jaxcompress: compress, sweep, evaluate, pretrain, distill, prune_train (also
installed as `jaxcompress-<name>` console scripts), the result tables in `tables/` and the speed and memory
benchmarks in `benchmarks/`."""
