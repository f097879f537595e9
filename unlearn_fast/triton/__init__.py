"""Triton kernels (GPU; on the CPU only under TRITON_INTERPRET=1).  Imported lazily by
the op modules: triton is an optional dependency."""
