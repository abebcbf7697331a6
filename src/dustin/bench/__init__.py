"""Speed benchmarks on a GPU: kernels against PyTorch, and whole decoding steps per method."""
