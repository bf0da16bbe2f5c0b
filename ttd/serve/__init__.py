"""Serving: the HTTP front, tritonserver supervision and `ttd serve` as a library function."""
