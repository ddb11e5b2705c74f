# FLIP's JupyterHub: `jupyterhub -f hub_config/jupyterhub_config.py`.
# $FLIP_HUB_PROFILE chooses the profile: "local" (`flip hub`, tests: local processes on 127.0.0.1)
# or "production" (deploy/compose.hub.yml: DockerSpawner, TLS, OpenID Connect, idle culler).
# What each sets, and why, is in hub_config/profiles.py.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this folder's package

from hub_config.profiles import configure  # noqa: E402

c = get_config()  # noqa: F821  (JupyterHub provides it)
configure(c)
