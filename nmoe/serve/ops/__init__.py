"""One Python entry per op: a torch reference (the CPU path) and the CUDA kernel from nmoe._C."""
