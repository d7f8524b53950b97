"""Tests of ext_proc.h2grpc, with a raw HTTP/2 client."""
