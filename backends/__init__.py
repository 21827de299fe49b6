"""tinyclip's built-in backends, installed as the package `tinyclip_backends`.

One module per device family. Each registers its Backend classes in setup.cfg
under the entry-point group `tinyclip.backends`, exactly as a third-party
plugin would (see tinyclip/backend.py for the interface).
"""
