"""The target-independent code of every hypernetwork: one implementation, used twice.

The runtime library imports these modules; generated files carry the definitions they use,
copied verbatim (``hypernn_gen.extract.kernel_source``) into one section that starts with
``# -- hypernn-gen kernel <KERNEL_VERSION>`` and ends with ``# -- end of hypernn-gen kernel``.
So nothing here may read a global that describes one target: layout constants are arguments.

Rules for code in this package, because it is copied into files people commit:
- plain functions and classes, black-formatted at line length 100 (the generated files' format),
  so that the copy is byte-identical to the source;
- imports at the top of each module; a module may import names from a sibling kernel module
  with ``from .sibling import name`` (the copy follows such imports and drops them);
- no import of anything else from ``hypernn_gen``.
"""

KERNEL_VERSION = "1"
