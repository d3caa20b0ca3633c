"""Small helpers shared by the core: atomic file writes, fingerprints, seeding."""
