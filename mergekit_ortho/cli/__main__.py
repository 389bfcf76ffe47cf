"""`python -m mergekit_ortho.cli`."""
from . import main

main()
