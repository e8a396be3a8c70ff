"""The gateway: routes each request to an expert, watches health, streams answers back."""

if __name__ != "expertmesh.gateway":  # ``import gateway`` from the repository root: a second copy
    raise ImportError(
        f"import expertmesh.gateway, not {__name__}: the gateway/ folder is that package (package-dir)"
    )
