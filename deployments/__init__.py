"""Ray Serve deployments: the gateway ingress, engine servers, and the app builders named by the
rendered ``serveConfigV2`` import paths. Thin shells around ``arks_ray``."""
