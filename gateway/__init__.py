"""The gateway: routes each request to an expert, watches health, streams answers back."""
