"""FLIP's JupyterHub configuration (``jupyterhub -f hub_config/jupyterhub_config.py``);
see :mod:`hub_config.profiles`."""
