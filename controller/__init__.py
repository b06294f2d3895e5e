"""The kopf operator that reconciles Arks resources into RayServices (issue #5; not built yet)."""
