"""Tests of ext_proc.dev (the demo, the local stack's processes)."""
