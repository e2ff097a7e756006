"""`clora bench`: experiment throughput of one warm runtime against one-at-a-time jobs, side by side."""
