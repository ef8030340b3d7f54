"""One module per method; importing this package registers every method."""
from jaxspec.models import acc, ccnet, mstpp  # noqa: F401  (registration side effect)
