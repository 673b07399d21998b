"""Generated stubs of the offsite.v1 gRPC API (see protos/generate.py)."""
