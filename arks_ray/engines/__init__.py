"""What engine deployments and the gateway share: the stream protocol between them."""
