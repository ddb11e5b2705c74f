"""The site's data: its catalog (``catalog``: site.toml, fingerprints, splits), the dataset formats by name
(``formats``: tables in ``tables``, imaging datasets in ``image_datasets``), image files and their readers
(``images``, ``readers``, ``dicom``), manifests of images (``manifests``), and which of the site's files a task
process is handed (``formats.handed_files``, ``formats.bound_files``). The bottom layer of ``site_agent``: it
imports no other part of it."""
