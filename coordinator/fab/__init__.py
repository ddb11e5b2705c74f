"""The Flower app bundle (FAB) that FLIP submits for every run.

It holds no logic of its own: its two components name FLIP's ServerApp (installed at the
hub) and FLIP's ClientApp (installed at each site), so a site runs only the FLIP code its
admin installed.
"""

from pathlib import Path

FAB_DIR = Path(__file__).resolve().parent
