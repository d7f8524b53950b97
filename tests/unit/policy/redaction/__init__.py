"""Tests of ext_proc.policy.redaction."""
