"""strangler: a feature-flagged strangler-fig migration proxy."""

__version__ = "0.4.0"


def build() -> str:
    """How the per-request modules run: ``compiled`` (mypyc's C extension modules, as
    the wheel ships them where a C compiler was found) or ``pure Python``."""
    from proxy import server

    return "pure Python" if server.__file__.endswith(".py") else "compiled"
