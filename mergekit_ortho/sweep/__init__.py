"""`merge sweep` (issue 18): a grid of parameter values over one recipe, each point equal to a
plain `merge run`, with what does not depend on the swept values cached in a work directory.
grid.py: the axes and points; cache.py: the bounded, self-checking cache; driver.py: the loop."""
