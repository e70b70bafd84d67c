"""Storage media for fixed-size KV pages: device, pinned-host and NVMe tiers and the tiered store."""
