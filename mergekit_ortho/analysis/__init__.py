"""`merge analyze`: interference statistics of task vectors before merging (issue 18).

:mod:`.stats` the math on tensors, :mod:`.names` tensor groups, :mod:`.streaming` the one pass over
a plan's inputs, :mod:`.compat` header checks, :mod:`.advice` the recommendation rules (data),
:mod:`.report` terminal / JSON / HTML rendering.
"""
