"""Layer 5: the only code that turns a Recipe into built objects and a run folder.

Importing the package registers the demo backbone names (mmpeft.runs.demo): their builders run recipes, so they
live here, above the backbones layer whose registry they fill.
"""

import mmpeft.runs.demo  # noqa: F401
