"""The site's word: its policy (``policy``, pure decisions), code approvals (``approvals``), the hash-chained
audit log (``audit``), and the gate every step passes, policy before it runs and the output guard after
(``gate``: :class:`~site_agent.governance.gate.Governance`)."""
