"""``python -m cmsn_cube.cli``: the same as the ``cmsn-cube`` console script."""

from cmsn_cube.cli import main

main()
