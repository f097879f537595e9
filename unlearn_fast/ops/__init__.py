"""Fused ops.  Each module: eager reference, custom op (torch.library) with fake
kernels and autograd, backend registrations, functional API and nn.Module."""
