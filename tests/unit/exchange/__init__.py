"""Tests of ext_proc.exchange."""
