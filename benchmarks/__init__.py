"""Speed and quality benchmarks. Run one with `python -m benchmarks NAME`."""
