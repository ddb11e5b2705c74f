"""Training steps at the site: the agent's service of warm task processes (``service``), the task process
itself (``worker``, ``python -m site_agent.tasks.worker``), the cell run on the site's split (``runner``),
what the two say to each other (``messages``), what a run's process is given when the run adopts it, its own rows
only (``adoption``), and the site's compute device (``devices``)."""
