"""Block-hash chains, the global prefix registry and the longest-prefix router."""
