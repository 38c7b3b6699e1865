"""The built-in dit-digits model (see ``core``) and its model source (see ``source``)."""
from analysis.models.dit_digits.core import *  # noqa: F401,F403
