"""Expert services: one process per expert, one vLLM engine each."""

if __name__ != "expertmesh.services":  # ``import services`` from the repository root: a second copy
    raise ImportError(
        f"import expertmesh.services, not {__name__}: the services/ folder is that package (package-dir)"
    )
