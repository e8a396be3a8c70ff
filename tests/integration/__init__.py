"""Tests with real processes: experts with real engines, up, the gateway over them."""
