"""Tests of ext_proc.telemetry.metrics."""
