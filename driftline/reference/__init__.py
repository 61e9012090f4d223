"""Reference artifacts: what "normal" looks like for a model, per station and shift.

Build one from a manifest of reference events with :func:`build_reference`; load it in the
stream with :func:`load_reference` and use :meth:`Reference.assign` /
:meth:`Reference.baseline_for`.
"""

from driftline.reference.artifact import FORMAT_VERSION, ReferenceError
from driftline.reference.build import build_reference
from driftline.reference.index import BaselineView, Reference, load_reference

__all__ = ["FORMAT_VERSION", "BaselineView", "Reference", "ReferenceError", "build_reference",
           "load_reference"]
