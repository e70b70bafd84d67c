"""Storage media for fixed-size KV pages: device, pinned-host and NVMe tiers and the tiered store.

Nothing is imported here (importing ``tiers`` costs nothing); use the modules:

- :mod:`tiers.page_store` — the capability protocols, ``TierStats``, ``copy_pages``
- :mod:`tiers.device_tier`, :mod:`tiers.host_tier`, :mod:`tiers.nvme_tier` — the three media
- :mod:`tiers.tiered_store` — ``TieredStore``: placement, watermark migration, pins, prefetch
- :mod:`tiers.factory` — ``build_tiered_store`` from the ``tiers:`` configuration
- :mod:`tiers.fault_injection` — a FileIO wrapper that fails like a full or broken disk
"""
