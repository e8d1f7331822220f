"""Modules: auxiliary heads, EMA shadows, LAM."""
