"""Fused ops.  Each module: eager reference, custom op (torch.library) with fake
kernels and autograd, backend registrations, functional API and nn.Module.

``registry_all`` imports every op module so the backend registry knows them all."""
