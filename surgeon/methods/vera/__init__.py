"""VeRA: one shared pair of random projections, two trained scaling vectors per layer."""
