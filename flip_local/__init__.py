"""The ``flip`` command and the local federation: one machine playing hub and hospitals.

It sits above the roles: it prepares site folders (``site_agent``), starts the hub side
(``coordinator.hubside``) and the site agents as processes, writes the connection file that
notebooks read (``flip_core.paths``), fetches the public data sets and runs the demo. No role
imports it.
"""
