"""Optional native kernels (C++ through XLA's FFI); each has a pure-JAX fallback."""
