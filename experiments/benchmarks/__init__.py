"""Speed and memory benchmarks; what they share is in `benchlib` (timing, memory) and `solverlib` (solver phases)."""
