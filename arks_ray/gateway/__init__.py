"""Pure gateway policy: authentication, authorisation and backend choice over a ``GatewayConfig``.

Called by the ingress deployment (``deployments.gateway``). No I/O: stores and clocks come in as
arguments, so every decision is unit-testable.
"""
