"""Tests against other libraries: the laplace-torch backend and the Kronecker peers (BackPACK, curvlinops)."""
