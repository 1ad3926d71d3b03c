"""Tests of dckpt.integrations against the real trainer packages."""
